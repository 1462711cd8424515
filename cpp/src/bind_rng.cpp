// Bindings: Philox, standard normals, mean-field sampling.
#include "pybind.hpp"
#include "vigrad/kernels.hpp"
#include "vigrad/philox.hpp"

namespace vigrad::bind {

namespace {

template <class Real>
void def_rng(py::module_& m) {
  m.def(
      "standard_normal",
      [](std::uint64_t key, carray<Real> out, int workers) {
        require_ndim(out, 2, "out");
        check_workers(workers);
        const std::int64_t S = out.shape(0), D = out.shape(1);
        Real* o = out.mutable_data();
        py::gil_scoped_release release;
        core::kernels<Real>().standard_normal(key, S, D, o, workers);
      },
      py::arg("key"), py::arg("out").noconvert(), py::arg("workers"),
      "Fill out (S, D) with the normal draws (key, s, j).");
  m.def(
      "sample",
      [](std::uint64_t key, carray<Real> loc, carray<Real> scale, carray<Real> w, std::optional<carray<Real>> eps,
         int workers) {
        require_ndim(loc, 1, "loc");
        const std::int64_t D = loc.shape(0);
        require_shape(scale, {D}, "scale", "(D,) like loc");
        require_ndim(w, 2, "w");
        const std::int64_t S = w.shape(0);
        require_shape(w, {S, D}, "w", "(S, D)");
        Real* e = nullptr;
        if (eps) {
          require_shape(*eps, {S, D}, "eps", "(S, D) like w");
          e = eps->mutable_data();
        }
        check_workers(workers);
        const Real* l = loc.data();
        const Real* sc = scale.data();
        Real* wp = w.mutable_data();
        py::gil_scoped_release release;
        core::kernels<Real>().sample(key, l, sc, S, D, wp, e, workers);
      },
      py::arg("key"), py::arg("loc").noconvert(), py::arg("scale").noconvert(), py::arg("w").noconvert(),
      py::arg("eps").noconvert(), py::arg("workers"),
      "w[s, j] = loc[j] + scale[j] * eps[s, j] with eps the draws (key, s, j); eps written when given.");
}

}  // namespace

void bind_rng(py::module_& m) {
  m.def(
      "philox4x32_10",
      [](carray<std::uint32_t> counters, std::uint64_t key) {
        require_ndim(counters, 2, "counters");
        if (counters.shape(1) != 4)
          throw py::value_error("counters must have shape (n, 4), got " + shape_str(counters));
        const std::int64_t n = counters.shape(0);
        carray<std::uint32_t> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(4)});
        const std::uint32_t* c = counters.data();
        std::uint32_t* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          core::philox4x32_10_many(c, n, core::make_key(key), o);
        }
        return out;
      },
      py::arg("counters").noconvert(), py::arg("key"),
      "Philox4x32-10 of each row of counters (n, 4) under the 64-bit key (k0 = low word).");
  def_rng<double>(m);
  def_rng<float>(m);
}

}  // namespace vigrad::bind
