// What every CPU extension module (one per op family: attention, ddn, probe_demux, disk_mask) binds
// besides its kernels: build_info(), how this library was compiled. Included by exactly one source of
// each extension, the one that holds its PYBIND11_MODULE.
//
// pybind11 plus torch's tensor casters only: <torch/python.h> would triple the compile time of the
// module source (~16 s vs ~6 s on 2 cores), and the kernels' sources need no Python at all.
#pragma once

#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

// -DFASTCOMP_VARIANT=x86_64_v3 (fastcomp/_build.py, Variant.ident): the target this library was built for.
#ifndef FASTCOMP_VARIANT
#define FASTCOMP_VARIANT unknown
#endif
#define FASTCOMP_STRINGIFY_(x) #x
#define FASTCOMP_STRINGIFY(x) FASTCOMP_STRINGIFY_(x)

namespace fastcomp {

inline pybind11::dict build_info() {
  pybind11::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<int>(_OPENMP);
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_version"] = 0;
  info["openmp_max_threads"] = 1;
#endif
  info["torch_threads"] = at::get_num_threads();
  info["variant"] = std::string(FASTCOMP_STRINGIFY(FASTCOMP_VARIANT));  // Variant.ident
  info["vector"] = std::string(simd::kName);
  info["vector_bytes"] = simd::kVectorBytes;
  info["vector_registers"] = simd::kVectorRegisters;
  pybind11::list isa;  // the instruction sets the compiler was allowed to use
#ifdef __SSE4_2__
  isa.append("SSE4.2");
#endif
#ifdef __AVX__
  isa.append("AVX");
#endif
#ifdef __AVX2__
  isa.append("AVX2");
#endif
#ifdef __FMA__
  isa.append("FMA");
#endif
#ifdef __AVX512F__
  isa.append("AVX512F");
#endif
#ifdef __AVX512BW__
  isa.append("AVX512BW");
#endif
#ifdef __ARM_NEON
  isa.append("NEON");
#endif
#ifdef __ARM_FEATURE_SVE
  isa.append("SVE");
#endif
  info["simd"] = isa;
  return info;
}

}  // namespace fastcomp

// Inside PYBIND11_MODULE: FASTCOMP_BIND_BUILD_INFO(m);
#define FASTCOMP_BIND_BUILD_INFO(m)                                                                 \
  (m).def("build_info", &::fastcomp::build_info,                                                    \
          "How this extension was compiled: compiler, OpenMP, target variant, vector width, ISA")
