// A strict RFC 8259 check that runs before cJSON sees an incoming command.
//
// cJSON is lenient (it accepts "01", "1.", trailing control characters and invalid UTF-8),
// while Python's json module (the simulator and the backend's validators) is strict. Rejecting
// exactly what Python rejects makes the device and the simulator agree on which commands exist.
// NaN/Infinity are not JSON and are rejected here as Python's side rejects them explicitly.
#pragma once

#include <cstddef>
#include <string>

namespace meter {

// True when `text` is exactly one JSON value (surrounded by optional space/tab/CR/LF), with
// valid UTF-8, no raw control characters in strings, no lone UTF-16 surrogate escapes, numbers
// of at most 63 characters and containers nested at most 64 deep.
bool isStrictJson(const std::string& text);

}  // namespace meter
