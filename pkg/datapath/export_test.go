// This file lets the external tests load the datapath in a mode the
// running kernel would not choose.
package datapath

import "log/slog"

// OpenWithFeatures is Open, with the probed features passed through edit
// before the programs' constants are set from them.
func OpenWithFeatures(root string, log *slog.Logger, edit func(Features) Features) (*Datapath, error) {
	return open(root, log, func(log *slog.Logger) (Features, error) {
		fs, err := kernelFeatures(log)
		if err != nil {
			return nil, err
		}
		return edit(fs), nil
	})
}

// With returns a copy of fs in which the kernel has (or lacks) name.
func (fs Features) With(name string, have bool) Features {
	out := append(Features(nil), fs...)
	for i := range out {
		if out[i].Name == name {
			out[i].Have = have
		}
	}
	return out
}
