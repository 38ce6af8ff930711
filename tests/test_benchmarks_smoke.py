"""The benchmark scripts run end to end on tiny inputs (no timing is checked)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import bench_model
import bench_se
import pytest
import torch


def test_bench_se_prints_a_table_per_case(capsys: pytest.CaptureFixture[str]) -> None:
    threads = str(torch.get_num_threads())
    bench_se.main(
        ["--shapes", "2,16,4,4", "--rounds", "2", "--sample-ms", "0.05", "--threads", threads]
    )
    out = capsys.readouterr().out
    assert out.count("#### 2x16x4x4") == 4  # 2 formats x 2 modes
    for name in ("| tutorial |", "| attnblocks |", "| attnblocks (plain) |", "| copy |"):
        assert out.count(name) == 4


def test_bench_se_cold_cache_times_single_flushed_calls(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flushes = 0
    make_flush = bench_se.make_flush

    def counting_flush(device: torch.device, mib: int) -> Callable[[], None]:
        flush = make_flush(device, mib)

        def counted() -> None:
            nonlocal flushes
            flushes += 1
            flush()

        return counted

    monkeypatch.setattr(bench_se, "make_flush", counting_flush)
    threads = str(torch.get_num_threads())
    args = ["--shapes", "2,16,4,4", "--rounds", "3", "--threads", threads, "--cache", "cold"]
    bench_se.main([*args, "--flush-mib", "1", "--memory-format", "contiguous", "--mode", "forward"])
    out = capsys.readouterr().out
    assert "cold cache (flushed by writing 1 MiB before every timed call)" in out
    assert out.count("(float32, cpu, cold cache)") == 1
    implementations = out.count("| tutorial |") + out.count("| attnblocks") + out.count("| copy |")
    implementations += out.count("| timm |") + out.count("| torchvision |")
    assert flushes == 3 * implementations  # one flush before every timed call


def test_bench_se_rejects_a_flush_of_no_memory() -> None:
    with pytest.raises(SystemExit):
        bench_se.main(["--cache", "cold", "--flush-mib", "0"])


def test_bench_se_times_every_registered_block(capsys: pytest.CaptureFixture[str]) -> None:
    import attnblocks

    threads = str(torch.get_num_threads())
    args = ["--shapes", "2,16,4,4", "--rounds", "1", "--sample-ms", "0.05", "--threads", threads]
    bench_se.main([*args, "--memory-format", "contiguous", "--blocks", "all"])
    out = capsys.readouterr().out
    for block in attnblocks.available_blocks():
        if block != "se":
            # forward and fwd+bwd; twice more in the tables against timm's twin
            expected = 4 if block in bench_se.TIMM_TWINS else 2
            assert out.count(f"| attnblocks {block} |") == expected, block


def test_bench_model_prints_ratios_to_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    threads = str(torch.get_num_threads())
    args = ["--models", "tutorial_cnn", "--rounds", "1", "--steps", "1", "--batch", "2"]
    bench_model.main([*args, "--no-insert-se", "--threads", threads])
    out = capsys.readouterr().out
    assert out.count("#### tutorial_cnn") == 2  # train step and inference
    assert out.count("| baseline |") == 2 and out.count("| attnblocks |") == 2


def test_bench_model_under_bf16_autocast_and_channels_last(
    capsys: pytest.CaptureFixture[str],
) -> None:
    threads = str(torch.get_num_threads())
    args = ["--models", "tutorial_cnn", "--rounds", "1", "--steps", "1", "--batch", "2"]
    extra = ["--autocast", "bf16", "--memory-format", "channels_last", "--malloc", "keep"]
    bench_model.main([*args, *extra, "--no-insert-se", "--threads", threads])
    out = capsys.readouterr().out
    assert out.count("channels_last, bf16 autocast") == 2
    assert "glibc keeps freed memory" in out


def test_se_variants_of_the_tutorial_cnn_add_three_blocks() -> None:
    base = bench_model.tutorial_cnn()
    with_se = bench_model.add_se_to_tutorial_cnn(base, "attnblocks")
    blocks = [m for m in with_se.modules() if type(m).__name__ == "SEBlock"]
    assert [b.channels for b in blocks] == [32, 64, 128]
    assert with_se(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bench_se_pairs_blocks_with_timm_twins_and_a_reference_se(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("timm")
    import shutil

    import attnblocks

    # A second copy of the package stands in for another checkout (say, main's).
    shutil.copytree(Path(attnblocks.__file__).parent, tmp_path / "attnblocks")
    threads = str(torch.get_num_threads())
    args = ["--shapes", "2,16,4,4", "--rounds", "2", "--sample-ms", "0.05", "--threads", threads]
    extra = ["--memory-format", "contiguous", "--mode", "forward+backward", "--clock", "cpu"]
    blocks = ["--blocks", "eca", "ge", "cbam", "scse", "--impls", "timm", "attnblocks"]
    bench_se.main([*args, *extra, *blocks, "--reference-se", str(tmp_path)])
    out = capsys.readouterr().out
    assert "each block against its twin" in out and "cpu clock" in out
    for name in ("eca", "ge", "cbam"):
        assert f"| attnblocks {name} | " in out and f"| timm {name} | " in out
    assert "| timm scse |" not in out  # no twin in timm
    assert out.count("| attnblocks (reference) |") == 2  # its row in both tables
    assert sys.modules["attnblocks"] is attnblocks  # the current package is back in place


def test_bench_se_rejects_a_reference_without_attnblocks(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bench_se.main(["--reference-se", str(tmp_path)])


def test_bench_model_times_blocks_and_their_timm_twins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("timm")
    threads = str(torch.get_num_threads())
    args = ["--models", "tutorial_cnn", "--rounds", "1", "--steps", "1", "--batch", "2"]
    extra = ["--variants", "baseline", "--blocks", "eca", "scse", "--clock", "cpu"]
    bench_model.main([*args, *extra, "--no-insert-se", "--threads", threads])
    out = capsys.readouterr().out
    for variant in ("attnblocks eca", "timm eca", "attnblocks scse"):
        assert out.count(f"| {variant} |") == 2, variant
    assert "| timm scse |" not in out
