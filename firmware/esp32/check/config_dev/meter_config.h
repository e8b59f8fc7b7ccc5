// For the host compile check only: the example configuration built as a development image
// (the compiled-in identity and plain MQTT allowed), so that the glue's #if METER_DEV_IDENTITY
// code is compiled too.
#pragma once
#define METER_DEV_IDENTITY 1
#define METER_ALLOW_PLAIN_MQTT 1
#include "../../include/meter_config.example.h"
