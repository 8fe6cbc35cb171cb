package maps

// SetTrace switches the datapath's per-packet traces on or off and keeps the
// rest of the node config as it is. The config is one array entry written
// whole, so this is a read-modify-write: callers that may race (several
// monitors) serialise through pkg/events' monitor lock.
func (c *ConfigMap) SetTrace(on bool) error {
	cfg, err := c.Get()
	if err != nil {
		return err
	}
	if cfg.Trace == on {
		return nil
	}
	cfg.Trace = on
	return c.Put(cfg)
}
