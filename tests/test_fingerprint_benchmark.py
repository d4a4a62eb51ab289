"""benchmarks/fingerprint.py: a smoke run on the suite's tiny unet as a subprocess. No timing
is asserted: only that the page has one row per unet (a LoRA row where peft is installed),
with the unet's own counts, and that the settings walk is part of the fingerprint's time."""

import importlib.util

import pytest
from conftest import run_child

from bdia.integrations.diffusers.tiny import tiny_unet


@pytest.mark.slow  # a benchmark script's smoke run, in another process
def test_a_smoke_run_writes_a_row_per_unet_with_its_counts(tmp_path):
    out = tmp_path / "fingerprint.md"
    args = ["--smoke", "--repeats", "2", "--out", str(out)]
    proc = run_child(["benchmarks/fingerprint.py", *args], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert text == proc.stdout
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    lora = importlib.util.find_spec("peft") is not None
    assert [c[0] for c in cells] == ["tiny"] + (["tiny + LoRA rank 4"] if lora else [])
    assert ("no LoRA row" in text) is not lora
    unet = tiny_unet(conditional=True)
    parameters = f"{sum(p.numel() for p in unet.parameters()):,}"
    tensors = len(list(unet.parameters())) + len(list(unet.buffers()))
    assert cells[0][1:4] == [parameters, str(tensors), str(len(list(unet.modules())))]
    for c in cells:
        fingerprint, settings = float(c[4]), float(c[5])
        assert 0 < settings <= fingerprint
    if lora:  # the LoRA adds its layers' weights and modules
        assert int(cells[1][3]) > int(cells[0][3])
