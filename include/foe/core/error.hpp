#pragma once
// Typed exceptions of the foe library.
//
// One error strategy for the host API: every failure a user can cause (bad configuration, bad
// input, a broken file, a full cache, a failed peer rank) throws a subclass of foe::Error whose
// message names the offending value and the limit it broke, e.g.
//   "num_experts_per_tok (6) must be a multiple of num_expert_groups (8)".
// Catch foe::Error to handle them all, or a subclass to handle one kind.

#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace foe {

/// Base of every exception the library throws on purpose.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// A model or layer configuration is inconsistent (values that cannot work together).
class ConfigError : public Error {
public:
    using Error::Error;
};

/// A runtime argument is out of range: a token id outside the vocabulary, a wrong tensor shape
/// passed to a layer, an unknown configuration name.
class InvalidArgument : public Error {
public:
    using Error::Error;
};

/// A fixed capacity planned up front was exceeded: the KV cache of a sequence is full.
class CapacityError : public Error {
public:
    using Error::Error;
};

/// A file could not be read or written, or its contents are malformed (safetensors, config.json).
class FormatError : public Error {
public:
    using Error::Error;
};

/// A file or directory could not be opened, read or written at the operating-system level.
class IoError : public Error {
public:
    using Error::Error;
};

/// A collective failed, ranks disagree, another rank failed, or a collective timed out; the
/// message names the collective and the rank(s) concerned.
class CommError : public Error {
public:
    using Error::Error;
};

/// A NaN or an infinity appeared where ModelOptions::check_finite looks (the hidden state after a
/// layer, the logits); the message names the layer and the first bad position.
class NumericalError : public Error {
public:
    using Error::Error;
};

namespace detail {

/// Concatenates its arguments with operator<< into one message.
template <class... Args>
[[nodiscard]] std::string concat(Args&&... args)
{
    std::ostringstream os;
    (os << ... << std::forward<Args>(args));
    return os.str();
}

}  // namespace detail

/// Throws E with the concatenation of args as its message.
template <class E, class... Args>
[[noreturn]] void raise(Args&&... args)
{
    throw E(detail::concat(std::forward<Args>(args)...));
}

/// Throws E(message) when cond is false. A function, not a macro: no hidden locals, safe in if/else.
template <class E = InvalidArgument, class... Args>
void require(bool cond, Args&&... args)
{
    if (!cond) raise<E>(std::forward<Args>(args)...);
}

}  // namespace foe
