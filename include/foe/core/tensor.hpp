#pragma once
// Non-owning tensor views with shape and strides, and an owning contiguous host tensor.
//
// A TensorView never allocates or frees: it points into memory owned elsewhere (a Tensor, a
// weight file, a caller's buffer). Strides are in elements, so a view can select a column block
// of a row-major matrix (a group's slice of o_proj) without copying.

#include <array>
#include <cassert>
#include <initializer_list>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/types.hpp"

namespace foe {

/// "[2, 3, 4]": a shape as messages print it.
template <class Range>
[[nodiscard]] std::string format_shape(const Range& shape)
{
    std::string s = "[";
    bool first = true;
    for (auto e : shape) {
        s += (first ? "" : ", ") + std::to_string(e);
        first = false;
    }
    return s + "]";
}

template <class T, int Rank>
class TensorView {
    static_assert(Rank >= 1, "a tensor view has at least one dimension");

public:
    using value_type = std::remove_const_t<T>;
    using extents_type = std::array<index_t, Rank>;

    constexpr TensorView() = default;

    /// Contiguous row-major view of `shape` starting at data.
    constexpr TensorView(T* data, const extents_type& shape) : data_(data), shape_(shape)
    {
        index_t s = 1;
        for (int d = Rank - 1; d >= 0; --d) {
            strides_[d] = s;
            s *= shape_[d];
        }
    }

    /// Strided view: strides are in elements.
    constexpr TensorView(T* data, const extents_type& shape, const extents_type& strides)
        : data_(data), shape_(shape), strides_(strides)
    {
    }

    /// A view of T may be read through a view of const T.
    template <class U>
        requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
    constexpr TensorView(const TensorView<U, Rank>& other)
        : data_(other.data()), shape_(other.shape()), strides_(other.strides())
    {
    }

    [[nodiscard]] constexpr T* data() const noexcept { return data_; }
    [[nodiscard]] constexpr const extents_type& shape() const noexcept { return shape_; }
    [[nodiscard]] constexpr const extents_type& strides() const noexcept { return strides_; }
    [[nodiscard]] constexpr index_t extent(int d) const noexcept { return shape_[d]; }
    [[nodiscard]] constexpr index_t stride(int d) const noexcept { return strides_[d]; }
    [[nodiscard]] constexpr index_t size() const noexcept
    {
        return std::accumulate(shape_.begin(), shape_.end(), index_t{1}, std::multiplies<>{});
    }
    [[nodiscard]] constexpr bool empty() const noexcept { return size() == 0; }

    /// True when the elements are packed row-major with no gaps.
    [[nodiscard]] constexpr bool is_contiguous() const noexcept
    {
        index_t s = 1;
        for (int d = Rank - 1; d >= 0; --d) {
            if (shape_[d] != 1 && strides_[d] != s) return false;
            s *= shape_[d];
        }
        return true;
    }

    template <class... I>
        requires(sizeof...(I) == Rank && (std::is_integral_v<I> && ...))
    [[nodiscard]] constexpr T& operator()(I... idx) const noexcept
    {
        const std::array<index_t, Rank> i{static_cast<index_t>(idx)...};
        index_t off = 0;
        for (int d = 0; d < Rank; ++d) {
            assert(i[d] >= 0 && i[d] < shape_[d]);
            off += i[d] * strides_[d];
        }
        return data_[off];
    }

    /// Sub-view with the first index fixed.
    [[nodiscard]] constexpr auto operator[](index_t i) const noexcept
        requires(Rank > 1)
    {
        assert(i >= 0 && i < shape_[0]);
        std::array<index_t, Rank - 1> shape{}, strides{};
        for (int d = 1; d < Rank; ++d) {
            shape[d - 1] = shape_[d];
            strides[d - 1] = strides_[d];
        }
        return TensorView<T, Rank - 1>(data_ + i * strides_[0], shape, strides);
    }

    /// Elements [begin, begin + count) along dimension dim.
    [[nodiscard]] constexpr TensorView slice(int dim, index_t begin, index_t count) const
    {
        require(dim >= 0 && dim < Rank && begin >= 0 && count >= 0 && begin + count <= shape_[dim],
                "slice [", begin, ", ", begin + count, ") of dimension ", dim, " is outside its extent ",
                dim >= 0 && dim < Rank ? shape_[dim] : -1);
        TensorView v = *this;
        v.data_ = data_ + begin * strides_[dim];
        v.shape_[dim] = count;
        return v;
    }

    /// The elements as a span; only for contiguous views.
    [[nodiscard]] std::span<T> span() const
    {
        require(is_contiguous(), "span() needs a contiguous tensor view");
        return {data_, static_cast<std::size_t>(size())};
    }

private:
    T* data_ = nullptr;
    extents_type shape_{};
    extents_type strides_{};
};

template <class T> using VectorView = TensorView<T, 1>;
template <class T> using MatrixView = TensorView<T, 2>;

/// Owning, contiguous, row-major host tensor of any rank (the rank is a run-time value, so a
/// weight map can hold tensors of mixed rank).
template <class T>
class Tensor {
public:
    Tensor() = default;
    explicit Tensor(std::vector<index_t> shape) : shape_(std::move(shape))
    {
        index_t n = 1;
        for (index_t e : shape_) {
            require(e >= 0, "tensor extents must be non-negative, got ", e);
            n *= e;
        }
        data_.assign(static_cast<std::size_t>(n), T{});
    }
    Tensor(std::initializer_list<index_t> shape) : Tensor(std::vector<index_t>(shape)) {}

    [[nodiscard]] const std::vector<index_t>& shape() const noexcept { return shape_; }
    [[nodiscard]] int rank() const noexcept { return static_cast<int>(shape_.size()); }
    [[nodiscard]] index_t extent(int d) const { return shape_.at(static_cast<std::size_t>(d)); }
    [[nodiscard]] index_t size() const noexcept { return static_cast<index_t>(data_.size()); }
    [[nodiscard]] T* data() noexcept { return data_.data(); }
    [[nodiscard]] const T* data() const noexcept { return data_.data(); }
    [[nodiscard]] std::span<T> span() noexcept { return data_; }
    [[nodiscard]] std::span<const T> span() const noexcept { return data_; }
    [[nodiscard]] std::vector<T>& values() noexcept { return data_; }
    [[nodiscard]] const std::vector<T>& values() const noexcept { return data_; }

    /// A view of fixed rank; throws if the rank differs.
    template <int Rank>
    [[nodiscard]] TensorView<T, Rank> view()
    {
        return TensorView<T, Rank>(data_.data(), extents<Rank>());
    }
    template <int Rank>
    [[nodiscard]] TensorView<const T, Rank> view() const
    {
        return TensorView<const T, Rank>(data_.data(), extents<Rank>());
    }

private:
    template <int Rank>
    [[nodiscard]] std::array<index_t, Rank> extents() const
    {
        require(rank() == Rank, "tensor of rank ", rank(), " viewed with rank ", Rank);
        std::array<index_t, Rank> e{};
        for (int d = 0; d < Rank; ++d) e[d] = shape_[static_cast<std::size_t>(d)];
        return e;
    }

    std::vector<index_t> shape_;
    std::vector<T> data_;
};

}  // namespace foe
