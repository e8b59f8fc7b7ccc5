#include "meter/strict_json.h"

namespace meter {
namespace {

// Recursive-descent validator over bytes. Nesting is capped at kMaxDepth so that a hostile
// "[[[[..." payload cannot exhaust the 8 KiB Arduino loop-task stack.
class Validator {
public:
    explicit Validator(const std::string& s) : s_(s) {}

    bool run() {
        skipWs();
        if (!value(0)) return false;
        skipWs();
        return i_ == s_.size();
    }

private:
    static constexpr int kMaxDepth = 64;
    const std::string& s_;
    size_t i_ = 0;

    bool eof() const { return i_ >= s_.size(); }
    unsigned char peek() const { return static_cast<unsigned char>(s_[i_]); }

    void skipWs() {
        while (!eof() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++i_;
    }

    bool literal(const char* word) {
        for (const char* p = word; *p; ++p, ++i_) {
            if (eof() || s_[i_] != *p) return false;
        }
        return true;
    }

    bool value(int depth) {
        if (eof()) return false;
        switch (peek()) {
            case '{': return object(depth + 1);
            case '[': return array(depth + 1);
            case '"': return string();
            case 't': return literal("true");
            case 'f': return literal("false");
            case 'n': return literal("null");
            default: return number();
        }
    }

    // Containers nest at most kMaxDepth deep; meter_core.py's _depth() applies the same limit.
    bool object(int depth) {
        if (depth > kMaxDepth) return false;
        ++i_;  // '{'
        skipWs();
        if (!eof() && peek() == '}') { ++i_; return true; }
        for (;;) {
            skipWs();
            if (eof() || peek() != '"' || !string()) return false;
            skipWs();
            if (eof() || peek() != ':') return false;
            ++i_;
            skipWs();
            if (!value(depth)) return false;
            skipWs();
            if (eof()) return false;
            if (peek() == ',') { ++i_; continue; }
            if (peek() == '}') { ++i_; return true; }
            return false;
        }
    }

    bool array(int depth) {
        if (depth > kMaxDepth) return false;
        ++i_;  // '['
        skipWs();
        if (!eof() && peek() == ']') { ++i_; return true; }
        for (;;) {
            skipWs();
            if (!value(depth)) return false;
            skipWs();
            if (eof()) return false;
            if (peek() == ',') { ++i_; continue; }
            if (peek() == ']') { ++i_; return true; }
            return false;
        }
    }

    bool digits() {
        size_t start = i_;
        while (!eof() && peek() >= '0' && peek() <= '9') ++i_;
        return i_ > start;
    }

    // cJSON copies a number into a 64-byte buffer and fails on longer ones; the limit is made
    // explicit here (and in meter_core.py's _parse_number) so it does not depend on its version.
    static constexpr size_t kMaxNumberChars = 63;

    bool number() {
        size_t start = i_;
        if (!numberBody()) return false;
        return i_ - start <= kMaxNumberChars;
    }

    bool numberBody() {
        if (!eof() && peek() == '-') ++i_;
        if (eof()) return false;
        if (peek() == '0') {
            ++i_;
        } else if (peek() >= '1' && peek() <= '9') {
            digits();
        } else {
            return false;
        }
        if (!eof() && peek() == '.') {
            ++i_;
            if (!digits()) return false;
        }
        if (!eof() && (peek() == 'e' || peek() == 'E')) {
            ++i_;
            if (!eof() && (peek() == '+' || peek() == '-')) ++i_;
            if (!digits()) return false;
        }
        return true;
    }

    bool hex4(unsigned& out) {
        out = 0;
        for (int k = 0; k < 4; ++k, ++i_) {
            if (eof()) return false;
            unsigned char c = peek();
            unsigned v;
            if (c >= '0' && c <= '9') v = c - '0';
            else if (c >= 'a' && c <= 'f') v = c - 'a' + 10;
            else if (c >= 'A' && c <= 'F') v = c - 'A' + 10;
            else return false;
            out = out * 16 + v;
        }
        return true;
    }

    // One UTF-8 sequence starting at i_ (first byte >= 0x80): shortest form, no surrogates.
    bool utf8() {
        unsigned char c = peek();
        size_t extra;
        unsigned cp;
        if (c >= 0xC2 && c <= 0xDF) { extra = 1; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) { extra = 2; cp = c & 0x0F; }
        else if (c >= 0xF0 && c <= 0xF4) { extra = 3; cp = c & 0x07; }
        else return false;
        ++i_;
        for (size_t k = 0; k < extra; ++k, ++i_) {
            if (eof() || (peek() & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (peek() & 0x3F);
        }
        if (extra == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) return false;
        if (extra == 3 && (cp < 0x10000 || cp > 0x10FFFF)) return false;
        return true;
    }

    bool string() {
        ++i_;  // opening quote
        while (!eof()) {
            unsigned char c = peek();
            if (c == '"') { ++i_; return true; }
            if (c < 0x20) return false;
            if (c >= 0x80) {
                if (!utf8()) return false;
                continue;
            }
            if (c != '\\') { ++i_; continue; }
            ++i_;
            if (eof()) return false;
            c = peek();
            ++i_;
            if (c == 'u') {
                unsigned cp;
                if (!hex4(cp)) return false;
                if (cp >= 0xDC00 && cp <= 0xDFFF) return false;  // lone low surrogate
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    unsigned low;
                    if (!literal("\\u") || !hex4(low) || low < 0xDC00 || low > 0xDFFF) return false;
                }
            } else if (c != '"' && c != '\\' && c != '/' && c != 'b' && c != 'f' && c != 'n' &&
                       c != 'r' && c != 't') {
                return false;
            }
        }
        return false;
    }
};

}  // namespace

bool isStrictJson(const std::string& text) { return Validator(text).run(); }

}  // namespace meter
