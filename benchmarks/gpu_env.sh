# Source on a GPU machine that has jax but not this package installed:
# exposes the repository folders as the `extrapolax` namespace package.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p /tmp/extrapolax_pkg/extrapolax
for _d in attention pallas_kernels models experiments; do
  ln -sfn "$_root/$_d" "/tmp/extrapolax_pkg/extrapolax/$_d"
done
export PYTHONPATH="/tmp/extrapolax_pkg${PYTHONPATH:+:$PYTHONPATH}"
