#pragma once
// A small, strict JSON (RFC 8259) parser and writer for the files foe reads and writes: the
// header of a safetensors file and a Hugging Face config.json.
//
// Why its own: the library must build with nothing but a C++20 compiler. Why strict: its input
// is untrusted, so it accepts exactly RFC 8259 (no comments, trailing commas, NaN, leading zeros,
// lone surrogates or invalid UTF-8), limits nesting so that recursion cannot exhaust the stack,
// rejects duplicate object keys (two readers could otherwise disagree on which one wins), and
// reports every error with the source's name and the byte offset.
//
// Numbers keep what the text says: an integer literal that fits in 64 bits stays an exact
// std::int64_t (a tensor offset above 2^53 must not be rounded), every other number is a double.
// Objects keep their members in document order, so a file written from a Value reads back in the
// same order.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "foe/core/error.hpp"

namespace foe::json {

class Value;

/// Elements of a JSON array.
using Array = std::vector<Value>;
/// Members of a JSON object in document order; keys are unique (parse() and Value::set() keep
/// them so; a Value built directly from an Object trusts its caller).
using Object = std::vector<std::pair<std::string, Value>>;

/// The kind of a JSON value. Numbers come in two kinds: exact 64-bit integers and doubles.
enum class Kind : std::uint8_t { null, boolean, integer, floating, string, array, object };

/// Deepest nesting of arrays and objects that parse() accepts.
inline constexpr int max_depth = 128;

/// The kind with its article, for messages: "an integer", "a string", ...
[[nodiscard]] constexpr std::string_view kind_name(Kind k) noexcept;

/// A JSON value: null, boolean, number, string, array or object.
class Value {
public:
    /// null.
    Value() noexcept = default;
    Value(std::nullptr_t) noexcept {}
    Value(bool b) noexcept : data_(b) {}
    /// An integer; an unsigned value above INT64_MAX becomes the nearest double.
    template <std::integral I>
        requires(!std::same_as<I, bool>)
    Value(I i) noexcept;
    /// A double; throws InvalidArgument for NaN and infinities, which JSON cannot represent.
    Value(double d);
    Value(std::string s) noexcept : data_(std::move(s)) {}
    Value(std::string_view s) : data_(std::string(s)) {}
    /// Needed so that a string literal does not convert to bool.
    Value(const char* s) : data_(std::string(s)) {}
    Value(Array a) noexcept : data_(std::move(a)) {}
    Value(Object o) noexcept : data_(std::move(o)) {}

    [[nodiscard]] Kind kind() const noexcept { return static_cast<Kind>(data_.index()); }
    [[nodiscard]] bool is_null() const noexcept { return kind() == Kind::null; }
    [[nodiscard]] bool is_bool() const noexcept { return kind() == Kind::boolean; }
    /// True for both exact integers and doubles.
    [[nodiscard]] bool is_number() const noexcept { return is_integer() || kind() == Kind::floating; }
    /// True only for an integer literal that fits in std::int64_t ("8", not "8.0" or "1e3").
    [[nodiscard]] bool is_integer() const noexcept { return kind() == Kind::integer; }
    [[nodiscard]] bool is_string() const noexcept { return kind() == Kind::string; }
    [[nodiscard]] bool is_array() const noexcept { return kind() == Kind::array; }
    [[nodiscard]] bool is_object() const noexcept { return kind() == Kind::object; }

    // Accessors throw FormatError when the value has another kind: a document that does not have
    // the expected shape is malformed input. Callers that know the file name check is_*() first
    // and write a message that names the file and the key.
    [[nodiscard]] bool as_bool() const { return get<bool>(Kind::boolean); }
    [[nodiscard]] std::int64_t as_int() const { return get<std::int64_t>(Kind::integer); }
    /// The number as a double; an integer converts (rounding above 2^53).
    [[nodiscard]] double as_double() const;
    [[nodiscard]] const std::string& as_string() const { return get<std::string>(Kind::string); }
    [[nodiscard]] const Array& as_array() const { return get<Array>(Kind::array); }
    [[nodiscard]] Array& as_array() { return get<Array>(Kind::array); }
    [[nodiscard]] const Object& as_object() const { return get<Object>(Kind::object); }
    [[nodiscard]] Object& as_object() { return get<Object>(Kind::object); }

    /// The member named key, or nullptr when there is none or this is not an object. A linear
    /// search: the objects foe reads are small, or are walked in order.
    [[nodiscard]] const Value* find(std::string_view key) const noexcept;

    /// Appends to an array (FormatError if this is not one). Returns *this for chaining.
    Value& push_back(Value v);
    /// Sets an object member, replacing an existing one of the same key so that keys stay
    /// unique (FormatError if this is not an object). Returns *this for chaining.
    Value& set(std::string_view key, Value v);

    /// Structural equality; an integer never equals a double (8 != 8.0), as their text differs.
    friend bool operator==(const Value& a, const Value& b) noexcept { return a.data_ == b.data_; }

private:
    template <class T>
    [[nodiscard]] const T& get(Kind wanted) const;
    template <class T>
    [[nodiscard]] T& get(Kind wanted);

    // The order of the alternatives is the order of Kind.
    std::variant<std::nullptr_t, bool, std::int64_t, double, std::string, Array, Object> data_;
};

/// Parses one JSON document (surrounding whitespace allowed). Throws FormatError with a message
/// "<source_name>: invalid JSON at byte <offset>: <what>".
[[nodiscard]] Value parse(std::string_view text, std::string_view source_name);

/// Compact text of v. Doubles are written in the shortest form that reads back to the same
/// double, always with a '.' or an exponent so that they read back as doubles. Strings must be
/// valid UTF-8 (InvalidArgument otherwise), so that the output is valid JSON.
[[nodiscard]] std::string dump(const Value& v);

/// Like dump(), with one member or element per line indented by `indent` spaces per level (the
/// layout of Python's json.dump(indent=2)), for files that people read.
[[nodiscard]] std::string dump_pretty(const Value& v, int indent = 2);

/// s as a JSON string literal, quotes included; InvalidArgument if s is not valid UTF-8.
[[nodiscard]] std::string quote(std::string_view s);

namespace detail {

/// Length of the valid UTF-8 sequence starting at s[0], or 0 if it is not one (overlong forms,
/// UTF-16 surrogates and code points above U+10FFFF are invalid).
[[nodiscard]] std::size_t utf8_sequence_length(std::string_view s) noexcept;

/// s quoted for an error message: escaped like JSON, invalid bytes shown as \xNN, characters a
/// terminal would act on or not show (C1 controls, bidirectional overrides, zero-width marks)
/// as \uNNNN, and cut after about max_bytes of output with its length appended,
/// "\"abc...\" (52428800 bytes)", so that hostile input can neither drive the terminal that
/// shows the message nor make it huge.
[[nodiscard]] std::string describe_text(std::string_view s, std::size_t max_bytes = 120);

/// A file name or path for a message: escaped like describe_text() but without quotes, and
/// with the middle cut out when the result would pass max_bytes (the file name at the end is
/// what a reader needs). Plain paths come out unchanged.
[[nodiscard]] std::string describe_path(std::string_view path, std::size_t max_bytes = 1024);

/// v written compactly for an error message, cut to about max_bytes.
[[nodiscard]] std::string describe(const Value& v, std::size_t max_bytes = 120);

}  // namespace detail

// =============================================================================================
// Definitions
// =============================================================================================

constexpr std::string_view kind_name(Kind k) noexcept
{
    switch (k) {
    case Kind::null: return "null";
    case Kind::boolean: return "a boolean";
    case Kind::integer: return "an integer";
    case Kind::floating: return "a non-integer number";
    case Kind::string: return "a string";
    case Kind::array: return "an array";
    case Kind::object: return "an object";
    }
    return "?";
}

template <std::integral I>
    requires(!std::same_as<I, bool>)
Value::Value(I i) noexcept
{
    if constexpr (std::is_unsigned_v<I> && sizeof(I) >= sizeof(std::int64_t)) {
        if (i > static_cast<std::make_unsigned_t<std::int64_t>>(std::numeric_limits<std::int64_t>::max())) {
            data_ = static_cast<double>(i);
            return;
        }
    }
    data_ = static_cast<std::int64_t>(i);
}

inline Value::Value(double d) : data_(d)
{
    require<InvalidArgument>(std::isfinite(d), "JSON cannot represent the number ", d);
}

inline double Value::as_double() const
{
    if (const auto* i = std::get_if<std::int64_t>(&data_)) return static_cast<double>(*i);
    if (const auto* d = std::get_if<double>(&data_)) return *d;
    raise<FormatError>("JSON value ", detail::describe(*this, 60), " is ", kind_name(kind()), ", not a number");
}

template <class T>
const T& Value::get(Kind wanted) const
{
    if (const T* p = std::get_if<T>(&data_)) return *p;
    raise<FormatError>("JSON value ", detail::describe(*this, 60), " is ", kind_name(kind()), ", not ",
                       kind_name(wanted));
}

template <class T>
T& Value::get(Kind wanted)
{
    return const_cast<T&>(std::as_const(*this).get<T>(wanted));
}

inline const Value* Value::find(std::string_view key) const noexcept
{
    const auto* members = std::get_if<Object>(&data_);
    if (members == nullptr) return nullptr;
    for (const auto& [k, v] : *members)
        if (k == key) return &v;
    return nullptr;
}

inline Value& Value::push_back(Value v)
{
    as_array().push_back(std::move(v));
    return *this;
}

inline Value& Value::set(std::string_view key, Value v)
{
    Object& members = as_object();
    for (auto& [k, old] : members) {
        if (k == key) {
            old = std::move(v);
            return *this;
        }
    }
    members.emplace_back(std::string(key), std::move(v));
    return *this;
}

namespace detail {

inline std::size_t utf8_sequence_length(std::string_view s) noexcept
{
    if (s.empty()) return 0;
    const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
    const unsigned char lead = byte(0);
    if (lead < 0x80) return 1;
    std::size_t n = 0;
    unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the second byte (Unicode table 3-7)
    if (lead >= 0xc2 && lead <= 0xdf) {
        n = 2;
    } else if (lead >= 0xe0 && lead <= 0xef) {
        n = 3;
        if (lead == 0xe0) lo = 0xa0;  // overlong
        if (lead == 0xed) hi = 0x9f;  // UTF-16 surrogates
    } else if (lead >= 0xf0 && lead <= 0xf4) {
        n = 4;
        if (lead == 0xf0) lo = 0x90;  // overlong
        if (lead == 0xf4) hi = 0x8f;  // above U+10FFFF
    } else {
        return 0;
    }
    if (s.size() < n) return 0;
    if (byte(1) < lo || byte(1) > hi) return 0;
    for (std::size_t i = 2; i < n; ++i)
        if (byte(i) < 0x80 || byte(i) > 0xbf) return 0;
    return n;
}

/// Appends the JSON escape of an ASCII control character, quote or backslash, or returns false.
inline bool append_escape(std::string& out, char c)
{
    switch (c) {
    case '"': out += "\\\""; return true;
    case '\\': out += "\\\\"; return true;
    case '\b': out += "\\b"; return true;
    case '\f': out += "\\f"; return true;
    case '\n': out += "\\n"; return true;
    case '\r': out += "\\r"; return true;
    case '\t': out += "\\t"; return true;
    default: break;
    }
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u != 0x7f) return false;
    constexpr char hex[] = "0123456789abcdef";
    out += "\\u00";
    out += hex[u >> 4];
    out += hex[u & 0xf];
    return true;
}

/// The code point of the valid UTF-8 sequence of n bytes at s[0].
[[nodiscard]] inline std::uint32_t utf8_code_point(std::string_view s, std::size_t n) noexcept
{
    const auto byte = [&](std::size_t i) { return static_cast<std::uint32_t>(static_cast<unsigned char>(s[i])); };
    if (n == 1) return byte(0);
    std::uint32_t cp = byte(0) & (0x7fu >> n);
    for (std::size_t i = 1; i < n; ++i) cp = (cp << 6) | (byte(i) & 0x3fu);
    return cp;
}

/// Valid characters that a message must not carry raw: C1 controls (a terminal acts on U+009B
/// as on ESC [), and characters that hide or reorder what is shown (zero-width marks, line and
/// paragraph separators, bidirectional embeddings, overrides and isolates, the byte-order mark),
/// with which a name can pass for another.
[[nodiscard]] constexpr bool hidden_or_control(std::uint32_t cp) noexcept
{
    return (cp >= 0x80 && cp <= 0x9f) || cp == 0x061c || (cp >= 0x200b && cp <= 0x200f) ||
           (cp >= 0x2028 && cp <= 0x202e) || (cp >= 0x2060 && cp <= 0x2069) || cp == 0xfeff;
}

/// Appends s escaped: JSON escapes for quotes, backslashes and ASCII controls; with lenient, also
/// \xNN for each byte that is not UTF-8 and \uNNNN for hidden_or_control() characters (only for
/// messages: \xNN is not JSON). Without lenient, invalid UTF-8 throws InvalidArgument. Stops once
/// the output has grown by max_bytes and returns false; true when all of s was written.
inline bool append_escaped(std::string& out, std::string_view s, bool lenient, bool escape_quotes,
                           std::size_t max_bytes)
{
    constexpr char hex[] = "0123456789abcdef";
    const std::size_t start = out.size();
    std::size_t i = 0;
    while (i < s.size()) {
        if (out.size() - start >= max_bytes) return false;
        const char c = s[i];
        if ((escape_quotes || (c != '"' && c != '\\')) && append_escape(out, c)) {
            ++i;
            continue;
        }
        const std::size_t n = utf8_sequence_length(s.substr(i));
        if (n == 0) {
            if (!lenient)
                raise<InvalidArgument>("cannot write the string ", describe_text(s), " as JSON: it is not valid UTF-8");
            const auto u = static_cast<unsigned char>(c);
            out += "\\x";
            out += hex[u >> 4];
            out += hex[u & 0xf];
            ++i;
            continue;
        }
        if (const std::uint32_t cp = utf8_code_point(s.substr(i), n); lenient && hidden_or_control(cp)) {
            out += "\\u";
            for (int shift = 12; shift >= 0; shift -= 4) out += hex[(cp >> shift) & 0xf];
        } else {
            out.append(s.substr(i, n));
        }
        i += n;
    }
    return true;
}

/// Appends s as a quoted JSON string (see append_escaped()). When max_bytes cuts it, the quote
/// closes after "..." and the string's length follows: "abc..." (52428800 bytes).
inline void append_quoted(std::string& out, std::string_view s, bool lenient, std::size_t max_bytes)
{
    out += '"';
    const bool whole = append_escaped(out, s, lenient, /*escape_quotes=*/true, max_bytes);
    out += whole ? "\"" : "...\"";
    if (!whole) {
        out += " (";
        out += std::to_string(s.size());
        out += " bytes)";
    }
}

inline std::string describe_text(std::string_view s, std::size_t max_bytes)
{
    std::string out;
    append_quoted(out, s, /*lenient=*/true, max_bytes);
    return out;
}

inline std::string describe_path(std::string_view path, std::size_t max_bytes)
{
    // Quotes and backslashes stay as they are: the path is not quoted, and a Windows path keeps
    // its separators.
    std::string out;
    if (append_escaped(out, path, /*lenient=*/true, /*escape_quotes=*/false, max_bytes)) return out;
    // Too long: keep the head and the tail, cut between whole UTF-8 characters.
    std::string tail;
    const std::size_t keep = max_bytes / 2;
    std::size_t from = path.size() > keep ? path.size() - keep : 0;
    while (from < path.size() && (static_cast<unsigned char>(path[from]) & 0xc0) == 0x80) ++from;  // whole characters
    (void)append_escaped(tail, path.substr(from), /*lenient=*/true, /*escape_quotes=*/false, max_bytes);
    std::size_t cut = keep;
    while (cut > 0 && (static_cast<unsigned char>(out[cut]) & 0xc0) == 0x80) --cut;
    out.resize(cut);
    return out + "...(" + std::to_string(path.size()) + " bytes)..." + tail;
}

inline void append_double(std::string& out, double d)
{
    char buf[32];
    const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, d);
    if (ec != std::errc{}) raise<InvalidArgument>("cannot format the double ", d);  // cannot happen: 32 > 24
    const std::string_view text(buf, static_cast<std::size_t>(end - buf));
    out += text;
    // "10000" would read back as an integer; write "10000.0" as Python does.
    if (text.find_first_of(".e") == std::string_view::npos) out += ".0";
}

/// How write() lays out text.
struct WriteOptions {
    int indent = -1;                          ///< < 0: compact; else one item per line
    bool lenient = false;                     ///< invalid UTF-8 as \xNN (messages) instead of throwing
    std::size_t limit = std::string::npos;    ///< stop adding items once the output is this long
};

inline void write(std::string& out, const Value& v, const WriteOptions& o, int level)
{
    const auto newline = [&](int lvl) {
        if (o.indent < 0) return;
        out += '\n';
        out.append(static_cast<std::size_t>(o.indent) * static_cast<std::size_t>(lvl), ' ');
    };
    switch (v.kind()) {
    case Kind::null: out += "null"; return;
    case Kind::boolean: out += v.as_bool() ? "true" : "false"; return;
    case Kind::integer: out += std::to_string(v.as_int()); return;
    case Kind::floating: append_double(out, v.as_double()); return;
    case Kind::string: append_quoted(out, v.as_string(), o.lenient, o.limit); return;
    case Kind::array: {
        const Array& items = v.as_array();
        out += '[';
        for (std::size_t i = 0; i < items.size() && out.size() <= o.limit; ++i) {
            if (i > 0) out += ',';
            newline(level + 1);
            write(out, items[i], o, level + 1);
        }
        if (!items.empty()) newline(level);
        out += ']';
        return;
    }
    case Kind::object: {
        const Object& members = v.as_object();
        out += '{';
        for (std::size_t i = 0; i < members.size() && out.size() <= o.limit; ++i) {
            if (i > 0) out += ',';
            newline(level + 1);
            append_quoted(out, members[i].first, o.lenient, o.limit);
            out += o.indent < 0 ? ":" : ": ";
            write(out, members[i].second, o, level + 1);
        }
        if (!members.empty()) newline(level);
        out += '}';
        return;
    }
    }
}

/// Cuts `out` to at most max_bytes on a UTF-8 character boundary, marking the cut with "...".
inline void cut_to_characters(std::string& out, std::size_t max_bytes)
{
    if (out.size() <= max_bytes) return;
    std::size_t cut = max_bytes;
    while (cut > 0 && (static_cast<unsigned char>(out[cut]) & 0xc0) == 0x80) --cut;  // whole characters
    out.resize(cut);
    out += "...";
}

inline std::string describe(const Value& v, std::size_t max_bytes)
{
    if (v.is_string()) return describe_text(v.as_string(), max_bytes);
    std::string out;
    write(out, v, WriteOptions{.indent = -1, .lenient = true, .limit = max_bytes}, 0);
    cut_to_characters(out, max_bytes);
    return out;
}

/// Recursive-descent parser over a string_view; pos_ is the byte offset used in messages.
///
/// document() builds a Value tree. The token-level interface below it is for readers that know
/// the shape of their document (a safetensors header, a model index): check_document() checks
/// the syntax of the whole text without building anything, then members(), elements() and the
/// scalar readers walk it and keep only what the reader needs. A tree costs far more than its
/// text (a Value is 40 bytes, so an array of one-digit numbers costs 20 times its text), which a
/// reader of untrusted files cannot afford: walking keeps memory within a small multiple of
/// what is kept.
class Parser {
public:
    Parser(std::string_view text, std::string_view source, std::size_t pos = 0)
        : text_(text), source_(source), pos_(pos)
    {
    }

    Value document()
    {
        skip_whitespace();
        Value v = value(0);
        skip_whitespace();
        if (pos_ != text_.size()) fail(pos_, "unexpected ", here(), " after the end of the document");
        return v;
    }

    /// Checks that the whole text is one JSON document, as document() would, but builds nothing
    /// (duplicate keys are the caller's to find: that needs the keys). The number of members of
    /// the top level when it is an object, else 0.
    std::size_t check_document()
    {
        skip_whitespace();
        std::size_t members_at_top = 0;
        if (!at_end() && peek() == '{') {
            members(1, [&](std::string_view, std::size_t) {
                ++members_at_top;
                skip(1);
            });
        } else {
            skip(0);
        }
        skip_whitespace();
        if (pos_ != text_.size()) fail(pos_, "unexpected ", here(), " after the end of the document");
        return members_at_top;
    }

    // --- token level ----------------------------------------------------------------------------

    /// A parser of the same text at byte offset pos (for a second look at a value).
    [[nodiscard]] Parser at(std::size_t pos) const { return Parser(text_, source_, pos); }

    [[nodiscard]] std::size_t pos() const noexcept { return pos_; }
    [[nodiscard]] bool at_end() const noexcept { return pos_ >= text_.size(); }
    /// The byte at pos(); only when !at_end().
    [[nodiscard]] char peek() const noexcept { return text_[pos_]; }
    /// True when a value of that kind starts at pos(): '{', '[', '"', 'n' or a number's first byte.
    [[nodiscard]] bool at_object() const noexcept { return !at_end() && peek() == '{'; }
    [[nodiscard]] bool at_array() const noexcept { return !at_end() && peek() == '['; }
    [[nodiscard]] bool at_string() const noexcept { return !at_end() && peek() == '"'; }
    [[nodiscard]] bool at_null() const noexcept { return !at_end() && peek() == 'n'; }
    [[nodiscard]] bool at_number() const noexcept { return !at_end() && (peek() == '-' || digit()); }

    /// Throws FormatError "<source>: invalid JSON at byte <at>: <args>".
    template <class... Args>
    [[noreturn]] void fail(std::size_t at, Args&&... args) const
    {
        raise<FormatError>(source_, ": invalid JSON at byte ", at, ": ", std::forward<Args>(args)...);
    }

    /// The byte at pos_, for messages.
    [[nodiscard]] std::string here() const
    {
        if (at_end()) return "end of input";
        const auto u = static_cast<unsigned char>(peek());
        if (u >= 0x21 && u < 0x7f) return std::string("character '") + peek() + "'";
        constexpr char hex[] = "0123456789abcdef";
        return std::string("byte 0x") + hex[u >> 4] + hex[u & 0xf];
    }

    void skip_whitespace() noexcept
    {
        while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
    }

    /// The value at pos_, built (depth: the nesting of the container it is in, 0 at the top).
    Value value(int depth)
    {
        if (at_end()) fail(pos_, "expected a value, got end of input");
        switch (peek()) {
        case '{': {
            Object items;
            std::vector<std::size_t> key_offsets;
            members(depth + 1, [&](std::string_view key, std::size_t key_offset) {
                std::string name(key);  // before value(): the key's buffer is reused by nested objects
                key_offsets.push_back(key_offset);
                Value v = value(depth + 1);
                items.emplace_back(std::move(name), std::move(v));
            });
            check_unique_keys(items, key_offsets);
            return Value(std::move(items));
        }
        case '[': {
            Array items;
            elements(depth + 1, [&](std::size_t) { items.push_back(value(depth + 1)); });
            return Value(std::move(items));
        }
        case '"': return Value(string());
        case 't': literal("true"); return Value(true);
        case 'f': literal("false"); return Value(false);
        case 'n': literal("null"); return Value();
        default: break;
        }
        if (at_number()) return number();
        fail(pos_, "expected a value, got ", here());
    }

    /// Moves past the value at pos_, checking its syntax and building nothing.
    void skip(int depth)
    {
        if (at_end()) fail(pos_, "expected a value, got end of input");
        switch (peek()) {
        case '{': members(depth + 1, [&](std::string_view, std::size_t) { skip(depth + 1); }); return;
        case '[': elements(depth + 1, [&](std::size_t) { skip(depth + 1); }); return;
        case '"': scan_string(nullptr); return;
        case 't': literal("true"); return;
        case 'f': literal("false"); return;
        case 'n': literal("null"); return;
        default: break;
        }
        if (at_number()) {
            (void)number();
            return;
        }
        fail(pos_, "expected a value, got ", here());
    }

    /// The object at pos_ ('{'), at nesting depth (its own: 1 for the top level): for each member,
    /// member(key, key_offset) with pos_ at the value, which member must consume (value(depth),
    /// skip(depth), string(), ...). key stays valid until then: nested objects reuse its buffer.
    template <class F>
    void members(int depth, F&& member)
    {
        enter(depth);
        ++pos_;  // '{'
        skip_whitespace();
        if (!at_end() && peek() == '}') {
            ++pos_;
            return;
        }
        for (;;) {
            skip_whitespace();
            if (at_end() || peek() != '"') fail(pos_, "expected a string key, got ", here());
            const std::size_t key_offset = pos_;
            key_.clear();
            scan_string(&key_);
            skip_whitespace();
            expect(':', "after an object key");
            skip_whitespace();
            member(std::string_view(key_), key_offset);
            skip_whitespace();
            if (!at_end() && peek() == ',') {
                ++pos_;
                continue;
            }
            expect('}', "or ',' in an object");
            return;
        }
    }

    /// The array at pos_ ('['), at nesting depth: element(index) for each element, with pos_ at
    /// it, which element must consume.
    template <class F>
    void elements(int depth, F&& element)
    {
        enter(depth);
        ++pos_;  // '['
        skip_whitespace();
        if (!at_end() && peek() == ']') {
            ++pos_;
            return;
        }
        for (std::size_t i = 0;; ++i) {
            skip_whitespace();
            element(i);
            skip_whitespace();
            if (!at_end() && peek() == ',') {
                ++pos_;
                continue;
            }
            expect(']', "or ',' in an array");
            return;
        }
    }

    /// The string at pos_ ('"'), decoded.
    std::string string()
    {
        std::string out;
        scan_string(&out);
        return out;
    }

    /// The number at pos_: an integer Value when the literal is one that fits in 64 bits.
    Value number()
    {
        const std::size_t start = pos_;
        if (peek() == '-') ++pos_;
        if (!digit()) fail(pos_, "expected a digit after '-', got ", here());
        if (peek() == '0') {
            ++pos_;
            if (digit()) fail(start, "leading zeros are not allowed in numbers");
        } else {
            while (digit()) ++pos_;
        }
        const std::size_t int_end = pos_;
        bool integer = true;
        if (!at_end() && peek() == '.') {
            integer = false;
            ++pos_;
            if (!digit()) fail(pos_, "expected a digit after '.', got ", here());
            while (digit()) ++pos_;
        }
        const std::size_t frac_end = pos_;
        if (!at_end() && (peek() == 'e' || peek() == 'E')) {
            integer = false;
            ++pos_;
            if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
            if (!digit()) fail(pos_, "expected a digit in the exponent, got ", here());
            while (digit()) ++pos_;
        }
        const std::string_view literal = text_.substr(start, pos_ - start);
        const char* const first = literal.data();
        const char* const last = first + literal.size();
        if (integer) {
            std::int64_t i = 0;
            const auto [ptr, ec] = std::from_chars(first, last, i);
            if (ec == std::errc{} && ptr == last) return Value(i);
            // Too large for int64: fall through to double, as other JSON readers do.
        }
        double d = 0;
        const auto [ptr, ec] = std::from_chars(first, last, d);
        if (ec == std::errc{} && ptr == last) return Value(d);
        if (ec == std::errc::result_out_of_range && ptr == last) {
            if (underflows(start, int_end, frac_end)) return Value(literal.front() == '-' ? -0.0 : 0.0);
            fail(start, "number ", literal.substr(0, 40), literal.size() > 40 ? "..." : "",
                 " is outside the range of a double");
        }
        fail(start, "malformed number");  // cannot happen: the grammar was checked above
    }

    /// The kind of the value at pos_ (after whitespace), for messages.
    [[nodiscard]] Kind peek_kind() const
    {
        Parser p = at(pos_);
        p.skip_whitespace();
        if (p.at_end()) p.fail(p.pos_, "expected a value, got end of input");
        switch (p.peek()) {
        case '{': return Kind::object;
        case '[': return Kind::array;
        case '"': return Kind::string;
        case 't':
        case 'f': return Kind::boolean;
        case 'n': return Kind::null;
        default: break;
        }
        if (p.at_number()) return p.number().kind();
        p.fail(p.pos_, "expected a value, got ", p.here());
    }

    /// The value at pos_ written as describe() writes it, cut to about max_bytes, reading no
    /// more of it than that takes: a message may quote a 90 MB array, not build it.
    [[nodiscard]] std::string describe_value(std::size_t max_bytes = 120) const
    {
        Parser p = at(pos_);
        p.skip_whitespace();
        std::string out;
        try {
            if (p.at_string()) return describe_text(p.string(), max_bytes);
            p.write_compact(out, 0, max_bytes);
        } catch (const Enough&) {
        } catch (const FormatError&) {  // invalid text after the part shown
            out += "...";
        }
        cut_to_characters(out, max_bytes);
        return out;
    }

private:
    /// Thrown by write_compact() once its output is long enough.
    struct Enough {};

    void write_compact(std::string& out, int depth, std::size_t limit)
    {
        if (out.size() > limit) throw Enough{};
        if (at_object()) {
            out += '{';
            bool first = true;
            members(depth + 1, [&](std::string_view key, std::size_t) {
                out += first ? "" : ",";
                first = false;
                append_quoted(out, key, /*lenient=*/true, limit);
                out += ':';
                write_compact(out, depth + 1, limit);
            });
            out += '}';
        } else if (at_array()) {
            out += '[';
            elements(depth + 1, [&](std::size_t i) {
                out += i > 0 ? "," : "";
                write_compact(out, depth + 1, limit);
            });
            out += ']';
        } else if (at_string()) {
            append_quoted(out, string(), /*lenient=*/true, limit);
        } else {
            write(out, value(depth), WriteOptions{.indent = -1, .lenient = true, .limit = limit}, 0);
        }
    }

    [[nodiscard]] bool digit() const noexcept { return !at_end() && peek() >= '0' && peek() <= '9'; }

    void expect(char c, std::string_view context)
    {
        if (at_end() || peek() != c) fail(pos_, "expected '", c, "' ", context, ", got ", here());
        ++pos_;
    }

    void literal(std::string_view word)
    {
        if (text_.substr(pos_, word.size()) != word) fail(pos_, "invalid literal (expected ", word, ")");
        pos_ += word.size();
    }

    void enter(int depth) const
    {
        if (depth > max_depth) fail(pos_, "nesting deeper than ", max_depth, " levels");
    }

    /// O(n log n), so that a hostile header with millions of keys cannot make this quadratic.
    void check_unique_keys(const Object& members, const std::vector<std::size_t>& offsets) const
    {
        if (members.size() < 2) return;
        std::vector<std::size_t> order(members.size());
        std::iota(order.begin(), order.end(), std::size_t{0});
        std::stable_sort(order.begin(), order.end(),
                         [&](std::size_t a, std::size_t b) { return members[a].first < members[b].first; });
        std::size_t first_duplicate = members.size();
        for (std::size_t i = 1; i < order.size(); ++i)
            if (members[order[i]].first == members[order[i - 1]].first)
                first_duplicate = std::min(first_duplicate, order[i]);  // the later of an equal pair
        if (first_duplicate < members.size())
            fail(offsets[first_duplicate], "duplicate object key ", describe_text(members[first_duplicate].first));
    }

    [[nodiscard]] std::uint32_t hex4()
    {
        if (text_.size() - pos_ < 4) fail(pos_, "truncated \\u escape");
        std::uint32_t cp = 0;
        for (int i = 0; i < 4; ++i) {
            const char c = text_[pos_];
            std::uint32_t digit = 0;
            if (c >= '0' && c <= '9') digit = static_cast<std::uint32_t>(c - '0');
            else if (c >= 'a' && c <= 'f') digit = static_cast<std::uint32_t>(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') digit = static_cast<std::uint32_t>(c - 'A' + 10);
            else fail(pos_, "expected a hex digit in a \\u escape, got ", here());
            cp = cp * 16 + digit;
            ++pos_;
        }
        return cp;
    }

    static void append_utf8(std::string& out, std::uint32_t cp)
    {
        const auto put = [&](std::uint32_t b) { out += static_cast<char>(static_cast<unsigned char>(b)); };
        if (cp < 0x80) {
            put(cp);
        } else if (cp < 0x800) {
            put(0xc0 | (cp >> 6));
            put(0x80 | (cp & 0x3f));
        } else if (cp < 0x10000) {
            put(0xe0 | (cp >> 12));
            put(0x80 | ((cp >> 6) & 0x3f));
            put(0x80 | (cp & 0x3f));
        } else {
            put(0xf0 | (cp >> 18));
            put(0x80 | ((cp >> 12) & 0x3f));
            put(0x80 | ((cp >> 6) & 0x3f));
            put(0x80 | (cp & 0x3f));
        }
    }

    /// A \u escape after the backslash and 'u', with a following low surrogate if it is a high one.
    void unicode_escape(std::string* out, std::size_t escape_start)
    {
        std::uint32_t cp = hex4();
        if (cp >= 0xdc00 && cp <= 0xdfff)
            fail(escape_start, "lone low surrogate \\u", text_.substr(escape_start + 2, 4));
        if (cp >= 0xd800 && cp <= 0xdbff) {
            if (text_.substr(pos_, 2) != "\\u")
                fail(escape_start, "high surrogate \\u", text_.substr(escape_start + 2, 4),
                     " is not followed by a low surrogate escape");
            const std::size_t low_start = pos_;
            pos_ += 2;
            const std::uint32_t low = hex4();
            if (low < 0xdc00 || low > 0xdfff)
                fail(low_start, "high surrogate \\u", text_.substr(escape_start + 2, 4),
                     " is followed by \\u", text_.substr(low_start + 2, 4), ", not by a low surrogate");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
        }
        if (out != nullptr) append_utf8(*out, cp);
    }

    /// The string at pos_ ('"'), checked, and decoded into *out unless out is null.
    void scan_string(std::string* out)
    {
        ++pos_;  // opening quote
        const auto put = [&](char c) {
            if (out != nullptr) *out += c;
        };
        for (;;) {
            if (at_end()) fail(pos_, "unterminated string");
            const char c = peek();
            const auto u = static_cast<unsigned char>(c);
            if (c == '"') {
                ++pos_;
                return;
            }
            if (c == '\\') {
                const std::size_t escape_start = pos_;
                ++pos_;
                if (at_end()) fail(pos_, "unterminated string");
                const char e = peek();
                ++pos_;
                switch (e) {
                case '"': put('"'); break;
                case '\\': put('\\'); break;
                case '/': put('/'); break;
                case 'b': put('\b'); break;
                case 'f': put('\f'); break;
                case 'n': put('\n'); break;
                case 'r': put('\r'); break;
                case 't': put('\t'); break;
                case 'u': unicode_escape(out, escape_start); break;
                default: --pos_; fail(escape_start, "invalid escape: backslash followed by ", here());
                }
                continue;
            }
            if (u < 0x20) fail(pos_, "control ", here(), " in a string must be escaped");
            const std::size_t n = utf8_sequence_length(text_.substr(pos_));
            if (n == 0) fail(pos_, "invalid UTF-8 (", here(), ") in a string");
            if (out != nullptr) out->append(text_.substr(pos_, n));
            pos_ += n;
        }
    }

    /// For a literal that from_chars reported out of range: true if its magnitude is below the
    /// smallest double (it reads as zero, like Python's json), false if above the largest.
    [[nodiscard]] bool underflows(std::size_t start, std::size_t int_end, std::size_t frac_end) const
    {
        const std::size_t digits_begin = text_[start] == '-' ? start + 1 : start;
        // Decimal exponent of the leading significant digit, plus one.
        std::int64_t magnitude = 0;
        if (text_[digits_begin] != '0') {
            magnitude = static_cast<std::int64_t>(int_end - digits_begin);
        } else {
            std::size_t i = int_end + 1;  // after '.'
            while (i < frac_end && text_[i] == '0') ++i;
            magnitude = -static_cast<std::int64_t>(i - (int_end + 1));
        }
        // The exponent saturates: anything beyond +-10^9 decides the answer on its own.
        std::int64_t exponent = 0;
        std::size_t i = frac_end;
        if (i < text_.size() && (text_[i] == 'e' || text_[i] == 'E')) {
            ++i;
            const bool negative = text_[i] == '-';
            if (text_[i] == '+' || text_[i] == '-') ++i;
            for (; i < pos_; ++i) exponent = std::min<std::int64_t>(exponent * 10 + (text_[i] - '0'), 1'000'000'000);
            if (negative) exponent = -exponent;
        }
        return magnitude + exponent <= 0;
    }

    std::string_view text_;
    std::string_view source_;
    std::size_t pos_ = 0;
    std::string key_;  ///< the current object key, reused so that walking allocates nothing per key
};

}  // namespace detail

inline Value parse(std::string_view text, std::string_view source_name)
{
    return detail::Parser(text, source_name).document();
}

inline std::string dump(const Value& v)
{
    std::string out;
    detail::write(out, v, detail::WriteOptions{}, 0);
    return out;
}

inline std::string dump_pretty(const Value& v, int indent)
{
    require<InvalidArgument>(indent >= 0, "dump_pretty: indent (", indent, ") must be non-negative");
    std::string out;
    detail::write(out, v, detail::WriteOptions{.indent = indent}, 0);
    return out;
}

inline std::string quote(std::string_view s)
{
    std::string out;
    detail::append_quoted(out, s, /*lenient=*/false, std::string::npos);
    return out;
}

}  // namespace foe::json
