// Bindings: the update rules of vg.optim (optim.hpp), in place or into separate outputs.
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "pybind.hpp"
#include "vigrad/kernels.hpp"

namespace vigrad::bind {

namespace {

// An (input, output) pair of one update: the output is the input itself (in place) or does not
// overlap it.
struct Pair {
  py::array in, out;
  const char* name;
};

// Shapes, writeability and aliasing of one update's arrays; returns n.  Every output must be its
// own input or overlap nothing else; grads must not overlap any output.
inline std::int64_t check_update(const py::array& grads, const std::vector<Pair>& pairs) {
  const Pair& params = pairs.front();
  require_ndim(params.in, 1, "params");
  const std::int64_t n = params.in.shape(0);
  require_shape(grads, {n}, "grads", "(n,) like params");
  for (const Pair& p : pairs) {
    const std::string in_name = p.name, out_name = "out_" + in_name;
    require_shape(p.in, {n}, in_name.c_str(), "(n,) like params");
    require_shape(p.out, {n}, out_name.c_str(), "(n,) like params");
    if (!p.out.writeable()) throw py::value_error(out_name + " must be writeable");
    const bool same = p.in.data() == p.out.data();
    if (!same && overlaps(p.in, p.out))
      throw py::value_error(out_name + " must be " + in_name + " itself (in place) or not overlap it");
    if (overlaps(grads, p.out)) throw py::value_error(out_name + " must not overlap grads");
    for (const Pair& q : pairs) {
      if (&q == &p) continue;
      if (overlaps(p.out, q.out) || overlaps(p.out, q.in))
        throw py::value_error(out_name + " must not overlap " + q.name + " or out_" + q.name);
    }
  }
  return n;
}

template <class Real>
Real* wptr(py::array& a) {
  return static_cast<Real*>(a.mutable_data());
}

template <class Real>
const Real* rptr(const py::array& a) {
  return static_cast<const Real*>(a.data());
}

template <class Real>
void def_optim(py::module_& m) {
  m.def(
      "optim_adam",
      [](carray<Real> p, carray<Real> g, carray<Real> mm, carray<Real> v, carray<Real> p_out, carray<Real> m_out,
         carray<Real> v_out, std::int64_t step, double lr, double b1, double b2, double eps, double decay,
         int workers) {
        const std::int64_t n = check_update(g, {{p, p_out, "params"}, {mm, m_out, "m"}, {v, v_out, "v"}});
        if (step < 0) throw py::value_error("step must be >= 0, got " + std::to_string(step));
        check_workers(workers);
        const Real *pp = rptr<Real>(p), *gp = rptr<Real>(g), *mp = rptr<Real>(mm), *vp = rptr<Real>(v);
        Real *po = wptr<Real>(p_out), *mo = wptr<Real>(m_out), *vo = wptr<Real>(v_out);
        py::gil_scoped_release release;
        return core::kernels<Real>().adam_step(pp, gp, mp, vp, po, mo, vo, n, step, lr, b1, b2, eps, decay,
                                               workers);
      },
      py::arg("params").noconvert(), py::arg("grads").noconvert(), py::arg("m").noconvert(), py::arg("v").noconvert(),
      py::arg("out_params").noconvert(), py::arg("out_m").noconvert(), py::arg("out_v").noconvert(),
      py::arg("step"), py::arg("lr"), py::arg("b1"), py::arg("b2"), py::arg("eps"), py::arg("decay"),
      py::arg("workers"),
      "One Adam step (AdamStep's arithmetic) from (params, m, v) into the outputs, which may be the inputs "
      "themselves; params are first multiplied by decay = 1 - lr * weight_decay (skipped when 1).  Returns "
      "whether every gradient was finite.");
  m.def(
      "optim_sgd",
      [](carray<Real> p, carray<Real> g, std::optional<carray<Real>> buf, carray<Real> p_out,
         std::optional<carray<Real>> buf_out, double lr, double momentum, bool nesterov, double decay, int workers) {
        if (buf.has_value() != buf_out.has_value())
          throw py::value_error("buf and out_buf must be given together (with momentum) or both be None");
        std::vector<Pair> pairs{{p, p_out, "params"}};
        if (buf) pairs.push_back({*buf, *buf_out, "buf"});
        const std::int64_t n = check_update(g, pairs);
        check_workers(workers);
        const Real *pp = rptr<Real>(p), *gp = rptr<Real>(g), *bp = buf ? rptr<Real>(*buf) : nullptr;
        Real *po = wptr<Real>(p_out), *bo = buf ? wptr<Real>(*buf_out) : nullptr;
        py::gil_scoped_release release;
        return core::kernels<Real>().sgd_step(pp, gp, bp, po, bo, n, lr, momentum, nesterov, decay, workers);
      },
      py::arg("params").noconvert(), py::arg("grads").noconvert(), py::arg("buf").noconvert(),
      py::arg("out_params").noconvert(), py::arg("out_buf").noconvert(), py::arg("lr"), py::arg("momentum"),
      py::arg("nesterov"), py::arg("decay"), py::arg("workers"),
      "One SGD step (buf None: no momentum) into the outputs, which may be the inputs themselves.  Returns "
      "whether every gradient was finite.");
  m.def(
      "optim_rmsprop",
      [](carray<Real> p, carray<Real> g, carray<Real> s, std::optional<carray<Real>> buf, carray<Real> p_out,
         carray<Real> s_out, std::optional<carray<Real>> buf_out, double lr, double alpha, double eps,
         double momentum, double decay, int workers) {
        if (buf.has_value() != buf_out.has_value())
          throw py::value_error("buf and out_buf must be given together (with momentum) or both be None");
        std::vector<Pair> pairs{{p, p_out, "params"}, {s, s_out, "square_avg"}};
        if (buf) pairs.push_back({*buf, *buf_out, "buf"});
        const std::int64_t n = check_update(g, pairs);
        check_workers(workers);
        const Real *pp = rptr<Real>(p), *gp = rptr<Real>(g), *sp = rptr<Real>(s);
        const Real* bp = buf ? rptr<Real>(*buf) : nullptr;
        Real *po = wptr<Real>(p_out), *so = wptr<Real>(s_out), *bo = buf ? wptr<Real>(*buf_out) : nullptr;
        py::gil_scoped_release release;
        return core::kernels<Real>().rmsprop_step(pp, gp, sp, bp, po, so, bo, n, lr, alpha, eps, momentum, decay,
                                                  workers);
      },
      py::arg("params").noconvert(), py::arg("grads").noconvert(), py::arg("square_avg").noconvert(),
      py::arg("buf").noconvert(), py::arg("out_params").noconvert(), py::arg("out_square_avg").noconvert(),
      py::arg("out_buf").noconvert(), py::arg("lr"), py::arg("alpha"), py::arg("eps"), py::arg("momentum"),
      py::arg("decay"), py::arg("workers"),
      "One RMSprop step (buf None: no momentum) into the outputs, which may be the inputs themselves.  Returns "
      "whether every gradient was finite.");
  m.def(
      "moment_sums",
      [](carray<Real> x, std::optional<carray<double>> c, carray<double> s1, carray<double> s2, int workers) {
        require_ndim(x, 1, "x");
        const std::int64_t n = x.shape(0);
        if (c) require_shape(*c, {n}, "c", "(n,) like x");
        require_shape(s1, {n}, "s1", "(n,) like x");
        require_shape(s2, {n}, "s2", "(n,) like x");
        if (!s1.writeable() || !s2.writeable()) throw py::value_error("s1 and s2 must be writeable");
        if (overlaps(s1, s2)) throw py::value_error("s1 must not overlap s2");
        for (const py::array* out : {static_cast<const py::array*>(&s1), static_cast<const py::array*>(&s2)})
          if (overlaps(*out, x) || (c && overlaps(*out, *c)))
            throw py::value_error("s1 and s2 must not overlap x or c");
        check_workers(workers);
        const Real* xp = x.data();
        const double* cp = c ? c->data() : nullptr;
        double *p1 = s1.mutable_data(), *p2 = s2.mutable_data();
        py::gil_scoped_release release;
        core::kernels<Real>().moment_sums(xp, cp, p1, p2, n, workers);
      },
      py::arg("x").noconvert(), py::arg("c").noconvert(), py::arg("s1").noconvert(), py::arg("s2").noconvert(),
      py::arg("workers"),
      "In place, with a = float64(x) - c (c None: a = x): s1 += a, s2 += a * a, rounded as NumPy rounds them "
      "(no fused multiply-add): the running sums of vg.fit's convergence monitor and gradient statistics.");
}

}  // namespace

void bind_optim(py::module_& m) {
  def_optim<double>(m);
  def_optim<float>(m);
  m.def(
      "combine_moments",
      [](const std::vector<double>& counts, const std::vector<carray<double>>& means,
         const std::vector<carray<double>>& m2s, carray<double> out_mean, carray<double> out_m2, int workers) {
        const std::size_t k = counts.size();
        if (k == 0) throw py::value_error("counts must hold at least one group, got none");
        if (means.size() != k || m2s.size() != k)
          throw py::value_error("means and m2s must hold one array per group (" + std::to_string(k) + "), got " +
                                std::to_string(means.size()) + " and " + std::to_string(m2s.size()));
        require_ndim(out_mean, 1, "out_mean");
        const std::int64_t n = out_mean.shape(0);
        require_shape(out_m2, {n}, "out_m2", "(n,) like out_mean");
        if (!out_mean.writeable() || !out_m2.writeable()) throw py::value_error("out_mean and out_m2 must be writeable");
        if (overlaps(out_mean, out_m2)) throw py::value_error("out_mean must not overlap out_m2");
        std::vector<const double*> mp(k), Mp(k);
        for (std::size_t i = 0; i < k; ++i) {
          // a whole number in [1, 2^53] (the cast below is defined only in range: tested first)
          if (!(counts[i] >= 1.0 && counts[i] <= 9007199254740992.0) ||
              counts[i] != static_cast<double>(static_cast<std::int64_t>(counts[i])))
            throw py::value_error("counts must be positive integers, got " + std::to_string(counts[i]) + " at " +
                                  std::to_string(i));
          require_shape(means[i], {n}, "means[i]", "(n,) like out_mean");
          require_shape(m2s[i], {n}, "m2s[i]", "(n,) like out_mean");
          for (const py::array* in : {static_cast<const py::array*>(&means[i]), static_cast<const py::array*>(&m2s[i])})
            if (overlaps(*in, out_mean) || overlaps(*in, out_m2))
              throw py::value_error("out_mean and out_m2 must not overlap the groups' arrays");
          mp[i] = means[i].data();
          Mp[i] = m2s[i].data();
        }
        check_workers(workers);
        double *om = out_mean.mutable_data(), *oM = out_m2.mutable_data();
        const double* cp = counts.data();
        py::gil_scoped_release release;
        core::kernels<double>().combine_moments(mp.data(), Mp.data(), cp, static_cast<std::int64_t>(k), n, om, oM,
                                                workers);
      },
      py::arg("counts"), py::arg("means").noconvert(), py::arg("m2s").noconvert(), py::arg("out_mean").noconvert(),
      py::arg("out_m2").noconvert(), py::arg("workers"),
      "Into out_mean and out_m2, the (mean, M2) of the union of groups given per element as (counts[i], "
      "means[i], m2s[i]), by the left folds of vg.vi._combine with NumPy's rounding (Chan et al.'s update).");
}

}  // namespace vigrad::bind
