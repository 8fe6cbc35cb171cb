/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The programs include maps.h from here; it lives in lib/ because the
 * library's verdicts and encapsulation need it too, and lib/ includes
 * nothing above itself. */
#pragma once

#include "lib/maps.h"
