#pragma once
// Weights as they are stored: fp32, bf16 or fp16 elements, in memory foe owns or in a mapped
// weight file, and the matrix views the layers multiply by.
//
// A checkpoint in bf16 is half the bytes of its fp32 widening, and a decode step reads every
// weight once, so keeping weights in their stored type halves both the memory and the bytes a
// memory-bound step streams. Compute stays fp32: the host GEMM widens bf16/fp16 elements as it
// reads them (exact: every bf16 and fp16 value is a float), so a product with a bf16 weight is
// the same bits as with that weight widened to fp32 first.
//
// WeightTensor owns nothing itself: its bytes are kept alive by a shared owner (a vector, or the
// mapping of a file). Copies share the bytes; mutable_floats() copies them first when shared, so
// a copied ModelWeights can be changed without changing the original.

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "foe/core/dtype.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/core/types.hpp"

namespace foe {

/// The float value of a stored element.
[[nodiscard]] inline float widen(float v) noexcept { return v; }
[[nodiscard]] inline float widen(bfloat16 v) noexcept { return static_cast<float>(v); }
[[nodiscard]] inline float widen(float16 v) noexcept { return static_cast<float>(v); }

/// A read-only matrix view of weights in their stored dtype: rows of `cols` elements, `row_stride`
/// elements apart (a column block of a wider matrix has row_stride > cols). The bytes are owned
/// elsewhere (a WeightTensor), as for every view.
class WeightMatrix {
public:
    WeightMatrix() = default;
    template <class T>
    WeightMatrix(MatrixView<const T> m)  // NOLINT(google-explicit-constructor): a typed view is a weight matrix
        : dtype_(dtype_of<T>::value), data_(reinterpret_cast<const std::byte*>(m.data())), rows_(m.extent(0)),
          cols_(m.extent(1)), row_stride_(m.stride(0))
    {
        require(m.stride(1) == 1 || m.extent(1) <= 1, "a weight matrix needs unit stride along its rows");
    }
    template <class T>
    WeightMatrix(MatrixView<T> m) : WeightMatrix(MatrixView<const T>(m))  // NOLINT(google-explicit-constructor)
    {
    }
    /// Contiguous row-major [rows, cols] of T (float, bfloat16 or float16), as MatrixView's
    /// constructor: `{data, {rows, cols}}`.
    template <class T>
        requires requires { dtype_of<T>::value; }
    WeightMatrix(const T* data, const std::array<index_t, 2>& shape)
        : WeightMatrix(MatrixView<const T>(data, shape))
    {
    }
    WeightMatrix(DType dtype, const void* data, index_t rows, index_t cols, index_t row_stride)
        : dtype_(dtype), data_(static_cast<const std::byte*>(data)), rows_(rows), cols_(cols), row_stride_(row_stride)
    {
    }

    [[nodiscard]] DType dtype() const noexcept { return dtype_; }
    [[nodiscard]] index_t extent(int d) const noexcept { return d == 0 ? rows_ : cols_; }
    [[nodiscard]] std::array<index_t, 2> shape() const noexcept { return {rows_, cols_}; }
    [[nodiscard]] index_t stride(int d) const noexcept { return d == 0 ? row_stride_ : 1; }
    [[nodiscard]] bool empty() const noexcept { return rows_ == 0 || cols_ == 0; }
    [[nodiscard]] const void* data() const noexcept { return data_; }

    /// The view with its element type; InvalidArgument when the dtype differs.
    template <class T>
    [[nodiscard]] MatrixView<const T> as() const
    {
        require(dtype_ == dtype_of<T>::value, "weight matrix of dtype ", dtype_name(dtype_), " read as ",
                dtype_name(dtype_of<T>::value));
        return MatrixView<const T>(reinterpret_cast<const T*>(data_), {rows_, cols_}, {row_stride_, 1});
    }

    /// f(MatrixView<const T>) with T the stored element type.
    template <class F>
    decltype(auto) visit(F&& f) const
    {
        switch (dtype_) {
        case DType::bf16: return std::forward<F>(f)(as<bfloat16>());
        case DType::f16: return std::forward<F>(f)(as<float16>());
        case DType::f32: break;
        }
        return std::forward<F>(f)(as<float>());
    }

    /// Element (i, j) widened to float (for uploads and tests; kernels read the typed view).
    [[nodiscard]] float operator()(index_t i, index_t j) const
    {
        return visit([&](auto m) { return widen(m(i, j)); });
    }

    /// Row i widened into out (cols() floats).
    void widen_row(index_t i, float* out) const
    {
        visit([&](auto m) {
            for (index_t j = 0; j < cols_; ++j) out[j] = widen(m(i, j));
        });
    }

    /// Elements [begin, begin + count) along dimension dim, as TensorView::slice.
    [[nodiscard]] WeightMatrix slice(int dim, index_t begin, index_t count) const
    {
        const index_t extent = dim == 0 ? rows_ : cols_;
        require((dim == 0 || dim == 1) && begin >= 0 && count >= 0 && begin + count <= extent, "slice [", begin, ", ",
                begin + count, ") of dimension ", dim, " is outside its extent ", extent);
        WeightMatrix m = *this;
        if (dim == 0) {
            m.data_ += begin * row_stride_ * dtype_size(dtype_);
            m.rows_ = count;
        } else {
            m.data_ += begin * dtype_size(dtype_);
            m.cols_ = count;
        }
        return m;
    }

private:
    DType dtype_ = DType::f32;
    const std::byte* data_ = nullptr;
    index_t rows_ = 0, cols_ = 0, row_stride_ = 0;
};

/// A named model tensor as stored: dtype, shape, and bytes kept alive by a shared owner.
class WeightTensor {
public:
    WeightTensor() = default;

    /// Takes an fp32 tensor (random init, tests, a file read into memory).
    explicit WeightTensor(Tensor<float> t) : dtype_(DType::f32), shape_(t.shape())
    {
        auto owned = std::make_shared<std::vector<float>>(std::move(t.values()));
        data_ = reinterpret_cast<const std::byte*>(owned->data());
        owner_ = std::move(owned);
        owned_floats_ = true;
    }

    /// A tensor of `dtype` over bytes that `owner` keeps alive (a mapped file, a buffer); data
    /// must be aligned for the element type and hold the shape's elements, little-endian.
    WeightTensor(DType dtype, std::vector<index_t> shape, const std::byte* data, std::shared_ptr<const void> owner)
        : dtype_(dtype), shape_(std::move(shape)), data_(data), owner_(std::move(owner))
    {
        require(reinterpret_cast<std::uintptr_t>(data_) % static_cast<std::uintptr_t>(dtype_size(dtype_)) == 0,
                "weight tensor data of dtype ", dtype_name(dtype_), " is not aligned to its element size");
    }

    [[nodiscard]] DType dtype() const noexcept { return dtype_; }
    [[nodiscard]] const std::vector<index_t>& shape() const noexcept { return shape_; }
    [[nodiscard]] int rank() const noexcept { return static_cast<int>(shape_.size()); }
    [[nodiscard]] index_t size() const noexcept
    {
        index_t n = 1;
        for (index_t e : shape_) n *= e;
        return n;
    }
    [[nodiscard]] index_t byte_size() const noexcept { return size() * dtype_size(dtype_); }
    [[nodiscard]] const std::byte* bytes() const noexcept { return data_; }

    /// The tensor as a weight matrix (rank 2).
    [[nodiscard]] WeightMatrix matrix() const
    {
        require(rank() == 2, "tensor of rank ", rank(), " used as a matrix");
        return {dtype_, data_, shape_[0], shape_[1], shape_[1]};
    }

    /// An fp32 view (the dtype must be f32: vectors and router gates are kept in fp32 at load).
    template <int Rank>
    [[nodiscard]] TensorView<const float, Rank> view() const
    {
        require(dtype_ == DType::f32, "tensor of dtype ", dtype_name(dtype_), " viewed as F32");
        require(rank() == Rank, "tensor of rank ", rank(), " viewed with rank ", Rank);
        std::array<index_t, Rank> e{};
        for (int d = 0; d < Rank; ++d) e[d] = shape_[static_cast<std::size_t>(d)];
        return TensorView<const float, Rank>(reinterpret_cast<const float*>(data_), e);
    }

    /// The fp32 values in place (the dtype must be f32).
    [[nodiscard]] std::span<const float> floats() const
    {
        require(dtype_ == DType::f32, "tensor of dtype ", dtype_name(dtype_), " read as F32 values");
        return {reinterpret_cast<const float*>(data_), static_cast<std::size_t>(size())};
    }

    /// The values widened to fp32, as a new tensor.
    [[nodiscard]] Tensor<float> to_float() const
    {
        Tensor<float> out(shape_);
        float* dst = out.data();
        const index_t n = size();
        switch (dtype_) {
        case DType::f32: std::memcpy(dst, data_, static_cast<std::size_t>(n) * sizeof(float)); break;
        case DType::bf16:
            for (index_t i = 0; i < n; ++i) dst[i] = widen(reinterpret_cast<const bfloat16*>(data_)[i]);
            break;
        case DType::f16:
            for (index_t i = 0; i < n; ++i) dst[i] = widen(reinterpret_cast<const float16*>(data_)[i]);
            break;
        }
        return out;
    }

    /// This tensor, widened to fp32 when stored narrower (the same tensor when already f32).
    [[nodiscard]] WeightTensor widened() const { return dtype_ == DType::f32 ? *this : WeightTensor(to_float()); }

    /// The fp32 values, writable (tests that corrupt a weight): converts to an fp32 tensor of its
    /// own first unless this one is the only holder of owned fp32 bytes.
    [[nodiscard]] std::span<float> mutable_floats()
    {
        if (dtype_ != DType::f32 || owner_.use_count() != 1 || !owned_floats_) *this = WeightTensor(to_float());
        return {reinterpret_cast<float*>(const_cast<std::byte*>(data_)), static_cast<std::size_t>(size())};
    }

private:
    DType dtype_ = DType::f32;
    std::vector<index_t> shape_;
    const std::byte* data_ = nullptr;
    std::shared_ptr<const void> owner_;
    bool owned_floats_ = false;  // bytes are a vector<float> of this tensor's (the Tensor<float> constructor)
};

}  // namespace foe
