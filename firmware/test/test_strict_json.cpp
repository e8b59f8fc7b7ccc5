#include <doctest/doctest.h>

#include "meter/strict_json.h"

using meter::isStrictJson;

TEST_CASE("valid JSON per RFC 8259 is accepted") {
    for (const char* ok : {"{}", "[]", " {\"a\": [1, -0.5, 2e10, 1E-3, true, false, null]}\r\n", "\"\\u00e9\\ud83d\\ude00\"",
                           "0", "-0", "{\"k\":\"caf\xc3\xa9 \xf0\x9f\x98\x80\"}"}) {
        CAPTURE(ok);
        CHECK(isStrictJson(ok));
    }
}

TEST_CASE("what Python's json module rejects is rejected") {
    for (const char* bad : {"", " ", "{", "{\"a\":1,}", "[1,]", "01", "1.", ".5", "+1", "-", "1e", "NaN", "Infinity",
                            "{\"a\":1} {}", "{'a':1}", "\"\\x\"", "\"\\ud800\"", "\"\\udc00\"", "\"a\tb\"",
                            "{\"a\":1}\x01", "\"\xff\"", "\"\xc0\xaf\"", "\"\xed\xa0\x80\"", "tru", "nul"}) {
        CAPTURE(bad);
        CHECK_FALSE(isStrictJson(bad));
    }
    std::string deep(65, '[');
    deep += std::string(65, ']');
    CHECK_FALSE(isStrictJson(deep));
    CHECK(isStrictJson(std::string(64, '[') + std::string(64, ']')));
    CHECK(isStrictJson("1." + std::string(61, '5')));
    CHECK_FALSE(isStrictJson("1." + std::string(62, '5')));
}
