// For the host compile check only: the example configuration.
#pragma once
#include "../../include/meter_config.example.h"
