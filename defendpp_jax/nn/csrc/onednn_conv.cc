// 2-D convolution (NHWC activations, HWIO kernels, float32) through oneDNN, as XLA FFI handlers.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
  auto key() const { return std::make_tuple(n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr); }
  memory::desc src() const { return memory::desc({n, c, h, w}, dt::f32, tag::nhwc); }
  memory::desc dst() const { return memory::desc({n, o, oh, ow}, dt::f32, tag::nhwc); }
  memory::desc wei_user() const { return memory::desc({o, c, kh, kw}, dt::f32, tag::hwio); }
  memory::desc wei_any() const { return memory::desc({o, c, kh, kw}, dt::f32, tag::any); }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

// Each primitive owns its scratchpad (scratchpad_mode::user). With the library's default
// mode the scratchpad is a buffer per thread sized when a primitive is created, and XLA runs a
// handler on whichever of its pool's threads is free: a primitive created on one thread and
// executed on another overran the smaller buffer there (the GEMM-based kernel-gradient
// kernels oneDNN picks without AVX-512 need a large one: a segfault in im2col).
struct Prims {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_d_pd;
  dnnl::convolution_backward_data bwd_d;
  dnnl::convolution_backward_weights::primitive_desc bwd_w_pd;
  dnnl::convolution_backward_weights bwd_w;
  memory fwd_scratch, bwd_d_scratch, bwd_w_scratch;
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// XLA:CPU runs independent operations of one program concurrently on its thread pool. oneDNN's
// OpenMP kernels must not be executed from two threads at once: each caller becomes the master
// of its own OpenMP team and a kernel's barrier can then wait forever for a worker that never
// joins (a jitted function with independent convolutions hung on its first call). Every
// handler holds this lock while it runs; the kernels already use every core through OpenMP.
std::mutex& ExecMutex() {
  static std::mutex mu;
  return mu;
}

// The primitives of one geometry, created on first use. Callers hold ExecMutex().
Prims& Get(const Geometry& g) {
  static std::map<decltype(g.key()), std::unique_ptr<Prims>> cache;
  auto& slot = cache[g.key()];
  if (!slot) {
    auto& eng = Engine();
    auto fwd_pd = dnnl::convolution_forward::primitive_desc(
        eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.src(),
        g.wei_any(), g.dst(), g.strides(), g.pad_l(), g.pad_r(), UserScratchpad());
    auto bwd_d_pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, g.src(), g.wei_any(), g.dst(), g.strides(),
        g.pad_l(), g.pad_r(), fwd_pd, UserScratchpad());
    auto bwd_w_pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, g.src(), g.wei_any(), g.dst(), g.strides(),
        g.pad_l(), g.pad_r(), fwd_pd, UserScratchpad());
    slot.reset(new Prims{fwd_pd, dnnl::convolution_forward(fwd_pd), bwd_d_pd,
                         dnnl::convolution_backward_data(bwd_d_pd), bwd_w_pd,
                         dnnl::convolution_backward_weights(bwd_w_pd),
                         memory(fwd_pd.scratchpad_desc(), eng),
                         memory(bwd_d_pd.scratchpad_desc(), eng),
                         memory(bwd_w_pd.scratchpad_desc(), eng)});
  }
  return *slot;
}

// The kernel in the primitive's preferred layout (a reorder from HWIO when it differs).
memory KernelIn(const memory::desc& want, const Geometry& g, void* data, dnnl::stream& s) {
  memory user(g.wei_user(), Engine(), data);
  if (want == g.wei_user()) return user;
  memory m(want, Engine());
  dnnl::reorder(user, m).execute(s, user, m);
  return m;
}

Geometry Geom(ffi::Buffer<ffi::F32>& x, int64_t kh, int64_t kw, int64_t o, int64_t oh,
              int64_t ow, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
              int64_t pr) {
  auto d = x.dimensions();
  return Geometry{d[0], d[1], d[2], d[3], kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr};
}

}  // namespace

ffi::Error ConvFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pb, int64_t pl, int64_t pr) {
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  Geometry g = Geom(x, wd[0], wd[1], wd[3], yd[1], yd[2], sh, sw, pt, pb, pl, pr);
  try {
    std::lock_guard<std::mutex> exec(ExecMutex());
    Prims& p = Get(g);
    dnnl::stream s(Engine());
    memory src(g.src(), Engine(), x.typed_data());
    memory dst(g.dst(), Engine(), y->typed_data());
    memory wei = KernelIn(p.fwd_pd.weights_desc(), g, w.typed_data(), s);
    p.fwd.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst},
                     {DNNL_ARG_SCRATCHPAD, p.fwd_scratch}});
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

// Input gradient: dx from the output gradient g and the kernel w (x only gives the shape).
ffi::Error ConvBwdDataImpl(ffi::Buffer<ffi::F32> gy, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr) {
  auto wd = w.dimensions();
  auto gd = gy.dimensions();
  auto xd = dx->dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], gd[1], gd[2], sh, sw, pt, pb, pl, pr};
  try {
    std::lock_guard<std::mutex> exec(ExecMutex());
    Prims& p = Get(g);
    dnnl::stream s(Engine());
    memory diff_dst(g.dst(), Engine(), gy.typed_data());
    memory diff_src(g.src(), Engine(), dx->typed_data());
    memory wei = KernelIn(p.bwd_d_pd.weights_desc(), g, w.typed_data(), s);
    p.bwd_d.execute(s, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei},
                        {DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_SCRATCHPAD, p.bwd_d_scratch}});
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

// Kernel gradient: dw (HWIO) from the input x and the output gradient g.
ffi::Error ConvBwdWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                              int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto wd = dw->dimensions();
  auto gd = gy.dimensions();
  Geometry g = Geom(x, wd[0], wd[1], wd[3], gd[1], gd[2], sh, sw, pt, pb, pl, pr);
  try {
    std::lock_guard<std::mutex> exec(ExecMutex());
    Prims& p = Get(g);
    dnnl::stream s(Engine());
    memory src(g.src(), Engine(), x.typed_data());
    memory diff_dst(g.dst(), Engine(), gy.typed_data());
    memory user(g.wei_user(), Engine(), dw->typed_data());
    auto want = p.bwd_w_pd.diff_weights_desc();
    memory diff_wei = want == g.wei_user() ? user : memory(want, Engine());
    p.bwd_w.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                        {DNNL_ARG_DIFF_WEIGHTS, diff_wei}, {DNNL_ARG_SCRATCHPAD, p.bwd_w_scratch}});
    if (!(want == g.wei_user())) dnnl::reorder(diff_wei, user).execute(s, diff_wei, user);
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

#define CONV_ATTRS                                                                     \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb")     \
      .Attr<int64_t>("pl").Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DppConvFwd, ConvFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DppConvBwdData, ConvBwdDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DppConvBwdWeights, ConvBwdWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
