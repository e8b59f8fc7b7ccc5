// For the host compile check only: the TEST key (a release build generates its own header).
#pragma once
#include "../../../test/keys/test_ota_public_key.h"
