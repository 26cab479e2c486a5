"""The CUDA emulator (csrc/emu/) can fail: purpose-built kernels (csrc/emu/emu_selftest.inc) with a removed
__syncthreads(), an off-by-one shared-memory index, a shuffle with a wrong mask, a barrier in divergent
code and launch configurations CUDA rejects, each caught; their correct variants pass."""
import pytest
import torch

from emu_helpers import emu, needs_emu

pytestmark = needs_emu


def run(name, x, seed=0):
    emu().emu_set_seed(seed)
    return emu().emu_selftest(name, x)


def test_removed_syncthreads_is_a_race_the_random_schedule_exposes():
    x = torch.randn(4 * 128)
    expected = torch.roll(x.view(4, 128), -1, dims=1).reshape(-1)
    for seed in range(3):
        assert torch.equal(run("neighbor", x, seed), expected)
    # Without the barrier a thread reads its neighbour's slot before the neighbour wrote it: the block's
    # fresh shared memory (0xFF bytes) reads as NaN. Every seed exposes it, each with another pattern.
    bad = [torch.isnan(run("neighbor_no_barrier", x, seed)) for seed in range(3)]
    assert all(b.any() for b in bad)
    assert not torch.equal(bad[0], bad[1])


def test_off_by_one_shared_index_reads_the_nan_fill():
    x = torch.randn(100)
    good = run("window", x)
    torch.testing.assert_close(good[:99], x[:-1] + x[1:])
    bad = run("window_off_by_one", x)
    assert torch.isnan(bad[99]) and not torch.isnan(bad[:99]).any()


def test_shuffle_with_a_wrong_mask_is_an_error():
    x = torch.randn(32)
    torch.testing.assert_close(run("warp_sum", x), x.sum().expand(32), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match=r"__shfl_xor_sync\(0x0000ffff\).*not in the mask.*warp_sum_kernel"):
        run("warp_sum_half_mask", x)


def test_full_mask_shuffle_in_divergent_code_is_an_error():
    with pytest.raises(RuntimeError, match=r"deadlock in kernel partial_warp_kernel.*lanes 0xffff0000 named in the mask"):
        run("partial_warp", torch.randn(32))


def test_warp_scan_and_ballot():
    x = torch.randn(32)
    out = run("warp_scan", x)
    torch.testing.assert_close(out[:32], torch.cumsum(x, 0), atol=1e-5, rtol=1e-5)
    assert (out[32:] == (x > 0).sum()).all()


@pytest.mark.parametrize("mode, match", [
    (1, r"__syncthreads\(\) in divergent code: .* have exited \(kernel divergent_barrier_kernel"),
    (2, r"__syncthreads\(\) in divergent code: thread \d+ waits at emu_selftest.inc:\d+ while .* at emu_selftest.inc:\d+ "
        r"\(kernel divergent_barrier_kernel"),
])
def test_barrier_in_divergent_code_is_an_error_naming_the_kernel(mode, match):
    assert torch.equal(run("barrier_mode_0", torch.zeros(1)), torch.arange(128, dtype=torch.float32))
    for seed in range(3):
        with pytest.raises(RuntimeError, match=match):
            run(f"barrier_mode_{mode}", torch.zeros(1), seed)


@pytest.mark.parametrize("name, match", [
    ("threads_1025", r"threads per block outside \[1, 1024\]"),
    ("above_launch_bounds", r"256 threads per block exceed the kernel's __launch_bounds__\(128"),
    ("empty_grid", r"empty grid"),
    ("grid_y_too_large", r"grid too large"),
    # 16 KiB static + 33 KiB dynamic > 48 KiB without the opt-in: the static part counts too
    ("smem_33", r"16384 bytes of static and 33792 bytes of dynamic shared memory.*allows 49152"),
    # with the opt-in, static + dynamic must still fit the H200's 227 KiB
    ("smem_212_optin", r"16384 bytes of static and 217088 bytes of dynamic shared memory.*allows 232448"),
])
def test_launch_limits(name, match):
    with pytest.raises(RuntimeError, match=match):
        run(name, torch.zeros(1))


def test_launcher_shared_memory_check_counts_static_shared_memory():
    """Regression (found with the emulator): allow_smem compared only the dynamic bytes with the opt-in limit."""
    with pytest.raises(RuntimeError, match=r"anllm: kernel needs 217088 bytes of dynamic and 16384 bytes of static"):
        run("allow_smem_212", torch.zeros(1))


def test_launches_within_the_limits_run():
    assert (run("threads_1024", torch.zeros(1)) == 1).all()
    assert (run("smem_33_optin", torch.zeros(1)) == 3).all()  # static 1 + dynamic 2 in every thread


def test_atomic_add():
    x = torch.randn(1000)
    torch.testing.assert_close(run("atomic_sum", x), x.sum().view(1), atol=1e-4, rtol=1e-5)


def test_device_properties_of_an_h200():
    old = emu().emu_set_sm_count(132)
    assert old == 132


# ------------------------------------------------------------------------------------------------
# WMMA (nvcuda::wmma): fragments as warp-collective objects, against a plain matmul


def wmma_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    A, B, C0 = torch.randn(32, 48, generator=g), torch.randn(48, 32, generator=g), torch.randn(32, 32, generator=g)
    return A, B, C0, torch.cat([A.reshape(-1), B.reshape(-1), C0.reshape(-1)])


@pytest.mark.parametrize("layouts", ["rr", "rc", "cr", "cc"])
@pytest.mark.parametrize("dtype, tag", [(torch.float16, "h"), (torch.bfloat16, "b")])
def test_wmma_mma_equals_plain_matmul(dtype, tag, layouts):
    """load_matrix_sync (row/col-major A from shared memory, B from global memory, the fp32 accumulator),
    mma_sync (three k steps) and store_matrix_sync give A B + C0 of the dtype-rounded inputs with fp32
    accumulation: within fp32 rounding of the fp64 product."""
    A, B, C0, x = wmma_inputs()
    want = (A.to(dtype).double() @ B.to(dtype).double() + C0.double()).view(-1)
    got = run(f"wmma_{tag}_{layouts}", x)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-6)


@pytest.mark.parametrize("mode, match", [
    (1, r"wmma::load_matrix_sync at emu_selftest.inc:\d+: the matrix pointer must be 256-bit \(32-byte\) aligned"),
    (2, r"wmma::load_matrix_sync at emu_selftest.inc:\d+: the leading dimension \(58 elements\) must be >= 16 and "
        r"a multiple of 16 bytes"),
    (3, r"wmma::load_matrix_sync\(0xffffffff\) at emu_selftest.inc:\d+ in lane \d+ while lanes 0x[0-9a-f]+ of warp "
        r"\d+ wait in wmma::load_matrix_sync\(0xffffffff\) at emu_selftest.inc:\d+"),
])
def test_wmma_misuse_is_an_error(mode, match):
    with pytest.raises(RuntimeError, match=match):
        run(f"wmma_h_rr_{mode}", wmma_inputs()[3])


def test_wmma_register_layout_assumption_gives_wrong_results():
    """Reading an accumulator's entries from its registers (frag.x[i]) as if they were laid out row by row
    is undefined in CUDA; the emulator's deliberately scrambled layout makes such code fail."""
    A, B, C0, x = wmma_inputs()
    want = (A.half().double() @ B.half().double() + C0.double()).view(-1)
    got = run("wmma_h_rr_4", x).double()
    assert not torch.allclose(got, want, atol=1e-3)
    # the same multiset of values, only in the wrong places
    torch.testing.assert_close(got.sort().values, want.sort().values, atol=2e-5, rtol=2e-6)
