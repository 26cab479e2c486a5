"""Portable CPU builds: the extension runs on any x86-64 CPU.

setup.py compiles the attention kernels three times (baseline x86-64, AVX2+FMA+F16C, AVX-512) and the
extension picks the best one this CPU supports at run time, as ATen's DispatchStub does;
ANLLM_CPU_CAPABILITY=default|avx2|avx512 caps the choice. These tests run the oracle checks under every
variant this CPU can run (each in a subprocess: the choice is made once per process), check which
variant ran, and check that no code outside the AVX2/AVX-512 variants uses AVX instructions, so the
baseline cannot die with SIGILL on a CPU without them.
"""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

import anllm_ext
from anllm_ext import _C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "python_tests")
X86_LINUX = platform.machine() in ("x86_64", "AMD64") and sys.platform.startswith("linux")

# Oracle checks of the attention ops, run in a subprocess under a forced capability: prefill forward
# and backward with mixed padding (fp32, GQA), a decode step over a compacted cache (the split-key
# path), bf16, and a head dim that is no multiple of any vector width.
ORACLE_SCRIPT = r"""
import sys
import torch
import anllm_ext
from anllm_ext import _C, reference
sys.path.insert(0, sys.argv[2])
from helpers import kept_slots, layout, qkv, token_stream

assert _C.cpu_capability() == sys.argv[1], (_C.cpu_capability(), sys.argv[1])
torch.manual_seed(0)

def check(B, Hq, Hkv, T, D, dtype, tol, pattern="random", padding="mixed"):
    ids, mask = token_stream(B, T, pattern, padding)
    lay = layout(ids, mask)
    q, k, v = qkv(B, Hq, Hkv, T, T, D, dtype=dtype, requires_grad=True)
    out, lse = anllm_ext.anchor_attention_with_lse(q, k, v, lay, lay)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.anchor_attention_ref(qr, kr, vr, lay, lay, return_lse=True)
    ref_grads = torch.autograd.grad((ref_out * dout.float()).sum(), (qr, kr, vr))
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    for name, got, ref in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got.float(), ref, **tol, msg=lambda m: f"d{name} D={D} {dtype}: {m}")

fp32 = dict(atol=5e-5, rtol=1e-4)
check(2, 9, 3, 300, 64, torch.float32, fp32)
check(1, 4, 2, 200, 40, torch.float32, fp32, pattern="periodic", padding="left")
check(2, 4, 2, 130, 64, torch.bfloat16, dict(atol=3e-2, rtol=3e-2))

# Decode: one query over a compacted cache of ~900 slots (anchors in one run, then the open segment).
ids, mask = token_stream(1, 1601, "cache_like", "none")
full = layout(ids, mask)
index = torch.cat([kept_slots(full[:, :-1])[0].nonzero().squeeze(1), torch.tensor([1600])])[None]
k_lay = anllm_ext.Layout(*(t.gather(1, index) for t in full.as_tuple()))
q, k, v = qkv(1, 9, 3, 1, index.shape[1], 64)
out = anllm_ext.anchor_attention(q, k, v, full[:, -1:], k_lay)
torch.testing.assert_close(out, reference.anchor_attention_ref(q, k, v, full[:, -1:], k_lay), **fp32)
print("oracle checks passed with", _C.cpu_capability())
"""


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            line = next(l for l in f if l.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def cpu_supports(capability):
    """Independent of the extension's own detection: what /proc/cpuinfo lists."""
    flags = cpu_flags()
    avx2 = {"avx2", "fma", "f16c"} <= flags
    if capability == "avx2":
        return avx2
    if capability == "avx512":
        return avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    return True


# The subprocesses import the anllm_ext this test imported (installed in CI, the source tree with its in-place
# build in a developer's tree), never a source tree without the compiled extension from the working directory.
IMPORTED_FROM = os.path.dirname(os.path.dirname(os.path.abspath(anllm_ext.__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_python(code, *args, env_extra=None, cwd=TESTS_DIR, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "ANLLM_CPU_CAPABILITY"}
    env.update(env_extra or {})
    env["PYTHONPATH"] = pythonpath if pythonpath is not None else IMPORTED_FROM
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_x86_builds_have_all_variants():
    built = _C.built_cpu_capabilities()
    assert built[0] == "default"
    if X86_LINUX:
        assert built == ("default", "avx2", "avx512"), built


def test_unforced_choice_is_the_best_this_cpu_supports():
    best = [c for c in _C.built_cpu_capabilities() if cpu_supports(c)][-1]
    result = run_python("from anllm_ext import _C; print(_C.cpu_capability())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == best


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_forced_variant_runs_and_matches_the_reference(capability):
    if capability not in _C.built_cpu_capabilities():
        pytest.skip(f"this build has no {capability} variant (not x86-64 Linux)")
    if not cpu_supports(capability):
        pytest.skip(f"this CPU cannot run the {capability} variant")
    result = run_python(ORACLE_SCRIPT, capability, TESTS, env_extra={"ANLLM_CPU_CAPABILITY": capability})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"oracle checks passed with {capability}" in result.stdout


def test_capability_is_a_cap_not_a_demand():
    # Asking for more than the CPU or the build has runs the best available, as ATEN_CPU_CAPABILITY does.
    best = [c for c in _C.built_cpu_capabilities() if cpu_supports(c)][-1]
    result = run_python("from anllm_ext import _C; print(_C.cpu_capability())",
                        env_extra={"ANLLM_CPU_CAPABILITY": "AVX512"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == best


def test_unknown_capability_is_a_clear_error():
    code = (
        "import torch, anllm_ext\n"
        "from anllm_ext import _C\n"
        "for call in (_C.cpu_capability, lambda: anllm_ext.anchor_attention(*[torch.randn(1, 1, 4, 8)] * 3,\n"
        "             *[anllm_ext.token_layout(torch.ones(1, 4, dtype=torch.long), [1])] * 2)):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as e:\n"
        "        print('error:', e)\n"
        "    else:\n"
        "        print('no error')\n"
    )
    result = run_python(code, env_extra={"ANLLM_CPU_CAPABILITY": "sse9"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    for line in lines:
        assert "ANLLM_CPU_CAPABILITY must be one of default, avx2, avx512; got 'sse9'" in line, line


# ---- the machine code itself ----------------------------------------------------------------------

VARIANT_PREFIXES = ("anllm_cpu_avx2.", "anllm_cpu_avx512.", "anllm_cpu_attention_avx2", "anllm_cpu_attention_avx512")
AVX_REGISTER = re.compile(r"%[xyz]mm(1[6-9]|2\d|3[01])\b|%[yz]mm\d+\b|%k[0-7]\b")


def avx_functions(library):
    """{function name: first AVX instruction} for every function of `library` that uses one. An AVX
    instruction is VEX/EVEX-encoded: its mnemonic starts with 'v' (vmovups, vfmadd231ps, vzeroupper,
    ...), or it names a ymm/zmm/xmm16+/mask register."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-M", "att", library], capture_output=True,
                             text=True, check=True).stdout
    found, function = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            function = header.group(1)
            continue
        parts = line.split("\t")
        if function is None or len(parts) < 2 or function in found:
            continue
        mnemonic = parts[1].split()[0] if parts[1].split() else ""
        operands = parts[2] if len(parts) > 2 else ""
        if (mnemonic.startswith("v") and mnemonic not in ("verr", "verw")) or AVX_REGISTER.search(operands):
            found[function] = line.strip()
    return found


@pytest.mark.skipif(not X86_LINUX, reason="x86-64 Linux builds only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_only_the_variants_use_avx_instructions():
    library = _C.__file__
    symbols = subprocess.run(["nm", library], capture_output=True, text=True).stdout
    if "anllm_cpu_attention_default" not in symbols:
        pytest.skip("the library is stripped: its functions cannot be told apart")
    found = avx_functions(library)
    baseline = {name: insn for name, insn in found.items() if not name.startswith(VARIANT_PREFIXES)}
    assert not baseline, f"{len(baseline)} baseline functions use AVX, e.g. " + "; ".join(
        f"{name}: {insn}" for name, insn in list(baseline.items())[:5])
    # ... and the variants really were compiled with their flags.
    for prefix, register in (("anllm_cpu_avx2.", "%ymm"), ("anllm_cpu_avx512.", "%zmm")):
        listing = [insn for name, insn in found.items() if name.startswith(prefix)]
        assert listing, f"no {prefix} function uses AVX: the variant was compiled without its flags"


@pytest.mark.skipif(not os.environ.get("ANLLM_TEST_WHEEL"), reason="builds a wheel (minutes): set ANLLM_TEST_WHEEL=1")
def test_wheel_runs_the_oracle_checks_on_the_baseline(tmp_path):
    # The wheel of `pip wheel .`, installed on its own and imported from outside the source tree.
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(wheel_dir),
                    ROOT], check=True, env={**os.environ, "ANLLM_FORCE_CPU": "1"})
    [wheel] = list(wheel_dir.glob("anllm_ext-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    result = run_python(ORACLE_SCRIPT, "default", TESTS, env_extra={"ANLLM_CPU_CAPABILITY": "default"},
                        cwd=str(tmp_path), pythonpath=str(target))
    assert result.returncode == 0, result.stdout + result.stderr
    where = run_python("import anllm_ext; print(anllm_ext.__file__)", cwd=str(tmp_path), pythonpath=str(target))
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
