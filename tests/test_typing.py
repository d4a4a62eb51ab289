"""The package ships ``py.typed``: a type checker reads its annotations, so the everyday calls
must type-check as they run. mypy checks a user's file against the package, with the
package's own modules silent (``--follow-imports=silent``), as for any installed library."""

from __future__ import annotations

import re
import textwrap

import pytest
from conftest import REPO, run_child

pytest.importorskip("mypy", reason="mypy comes with the dev extra, which CI installs")

USER_CODE = textwrap.dedent(
    """
    import torch
    import bdia

    ode = bdia.DiffusionODE(lambda x, sigma: x / (1 + sigma[:, None] ** 2))
    ts = bdia.karras_grid(10)
    noise = 80.0 * torch.randn(4, 2, dtype=torch.float64)
    solver = bdia.bdia("heun", 0.96)

    x = bdia.sample(ode, solver, noise, ts)
    print(x.shape)
    pair = bdia.sample(ode, solver, noise, ts, return_pair=True)
    back = bdia.invert(ode, solver, pair, ts)
    print(back.earlier.shape)
    chains = bdia.sample(ode, bdia.edict("euler"), noise, ts, return_pair=True)
    print(bdia.invert(ode, bdia.edict("euler"), chains, ts).x.shape)
    y = bdia.odeint(lambda t, y: -y, torch.ones(3), torch.linspace(0, 1, 5))
    reveal_type(x)
    reveal_type(pair)
    reveal_type(back)
    reveal_type(chains)
    reveal_type(y)
    """
)


@pytest.mark.slow
def test_everyday_calls_type_check_with_the_types_they_return(tmp_path):
    """sample returns a Tensor, or with return_pair the solver's pair (StatePair for bdia,
    CoupledPair for edict), and invert likewise: no union a user would have to narrow."""
    user = tmp_path / "user.py"
    user.write_text(USER_CODE)
    result = run_child(
        [
            "-m",
            "mypy",
            "--follow-imports=silent",
            "--ignore-missing-imports",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(user),
        ],
        timeout=600,
        cwd=REPO,
    )
    lines = result.stdout.splitlines()
    errors = [line for line in lines if ": error:" in line]
    assert errors == [], "\n".join(errors)
    revealed = re.findall(r'Revealed type is "([^"]+)"', result.stdout)
    assert revealed == [
        "torch._tensor.Tensor",
        "bdia.pairs.StatePair",
        "bdia.pairs.StatePair",
        "bdia.pairs.CoupledPair",
        "torch._tensor.Tensor",
    ]
