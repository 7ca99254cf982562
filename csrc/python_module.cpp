// The Python module flora_ext._C: loading it registers the `flora` ops; it also
// exposes the host-side rules (layout, seed schedule) so Python never restates them.
#include "flora/ops.h"
#include "common/random.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "flora_ext compiled core: registers torch.ops.flora.*";
  m.def("next_seed", &flora::next_seed, py::arg("seed"),
        "Seed of the projection that follows the one drawn from `seed`.");
  m.def(
      "param_layout",
      [](const std::vector<int64_t>& shape, int64_t rank, double beta1,
         bool factorize_second_moment) {
        const flora::ParamLayout layout =
            flora::param_layout(shape, rank, beta1, factorize_second_moment);
        py::dict out;
        out["factored"] = layout.factored;
        out["momentum"] = flora::momentum_kind_name(layout.momentum);
        out["momentum_shape"] = layout.momentum_shape(shape);
        out["left"] = layout.left;
        out["rank"] = layout.rank;
        return out;
      },
      py::arg("shape"), py::arg("rank"), py::arg("beta1"), py::arg("factorize_second_moment"),
      "Which state a parameter of this shape gets (FLORA.md).");
  m.def("cuda_compiled", []() {
#ifdef FLORA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
