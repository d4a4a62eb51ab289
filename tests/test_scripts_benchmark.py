"""What the benchmark scripts refuse before any work: a smoke run without --out (whose default
is a published page or the package's networks) and arguments out of range; and the command
each page names being the one that ran."""

import pytest
from conftest import benchmark_module

SMOKE_DEFAULTS = {
    "reversible": "docs/benchmarks/reversible.md",
    "two_word": "docs/benchmarks/two_word.md",
    "digits_study": "docs/benchmarks/digits.md",
    "train_digits": "bdia/models/weights",
}


@pytest.mark.parametrize("script", sorted(SMOKE_DEFAULTS))
def test_a_smoke_run_without_out_is_refused(script, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark_module(script).main(["--smoke"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--smoke needs --out" in err and SMOKE_DEFAULTS[script] in err
