"""The canonical config and every hash taken over it are unchanged: saved runs and the shipped utility cache
(giaudit/assets/utility) are keyed by them.

The expected values were computed on the code before the config sections became typed objects; they are a
regression oracle. Paths the config resolves (the policy file, the shipped classifier) are absolute, so the
repository's location is replaced by ``<repo>`` before hashing, which keeps the oracle independent of where
the checkout lives; for configs without paths that is the plain hash. The raw and cell hashes of
defended, faces_folder, fedavg and mnist_ig_batch4 were recomputed when those examples' attack options changed
(a TV weight and lr tuned on the server's own data), and diffusion_gidm's when GIDM moved to an L-BFGS pixel
phase and screened starts: content changes, their utility keys unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

import giaudit.orchestration.plan as plan
import giaudit.utility as utility
from giaudit.config import AuditSpec, demo_config_path, load_config
from giaudit.demo import DEMO_DEFENSES, faces_spec
from giaudit.results import config_hash
from giaudit.training import TrainingSettings

REPO = Path(__file__).resolve().parents[1]

EXPECTED: dict[str, dict[str, Any]] = {
    "demo": {"raw": "f0288fb514268553",
             "cells": ["24c2b1957d5e32ca", "a8f15cb8c3a56a27", "ffabc6e966ef3325", "15cfd8c0c07cc5b7"],
             "utility": ["fffd76645b6dd707", "2a8f4d61d5587096"]},
    "examples/defended.toml": {"raw": "658d463d93daaf3e", "cells": ["166b1ddc7fd3242b", "d793e6b8721e94d8"],
                               "utility": ["1e887495150ac6fa", "7aeef02de8c6ee63"]},
    "examples/diffusion_gidm.toml": {"raw": "d2639c5636d7dc12", "cells": ["a9200322b6297800", "b5f756ca84f8a351"],
                                     "utility": ["def8bbd1883d4588"]},
    "examples/faces_folder.toml": {"raw": "1cc4f04ac5177fc3", "cells": ["764c59e291bd5104", "d987e1b625a47362"],
                                   "utility": ["515cc86af4fb3e30", "1db9a8f6280c71fa"]},
    "examples/fedavg.toml": {"raw": "e68464b256fb9eea", "cells": ["8eed2f9e3fd66192"],
                             "utility": ["701873b18c01c245"]},
    "examples/mnist_ig_batch4.toml": {"raw": "b1cf1bd3a5159c90", "cells": ["da4906a20691c092", "c0f54b6b93234636"],
                                      "utility": ["b49479271cb5e835", "6f451ae46b4e34e0"]},
    "examples/user_level_digits.toml": {"raw": "13dc5f3caed10906",
                                        "cells": ["7a88ce6546f94dea", "b84af25ebf145130", "d3ed291456ef11c1"],
                                        "utility": ["f341b814ef1e109d"]},
    "examples/flower/audit.toml": {"raw": "e782a98d5f127165", "cells": ["3687f6dea3980360"],
                                   "utility": ["a1ab7797bca905d1"]},
    "demo-faces": {"raw": "c6fc0348bfc2aebb", "cells": ["4150b0468af76b29", "388407d256f5caa1"],
                   "utility": ["515cc86af4fb3e30", "1db9a8f6280c71fa"]},
    "demo-checkpoints": {"raw": "1420fe6fbf52a634",
                         "cells": ["485113df78452a65", "69d6df15fc4bc77a", "5b98fcab77646cec", "f7e8d1144bf918c2",
                                   "29d3b26e6f6b41ff", "dd672f5776b9a7fd", "647dae35ab32394d", "70efebc9793a18f7"],
                         "utility": ["fffd76645b6dd707", "2a8f4d61d5587096"]},
    "demo-compare": {"raw": "efc222fb1ba7bc38",
                     "cells": ["2dc96ff67eb58bcf", "0f676d6cab8c5199", "9be4e010039f4d91", "74ea0f42437faf25",
                               "2d91f92095eda9ac", "3c66c29c656f3630"],
                     "utility": ["1f7284219d940be0", "11ffcb95c99df9be", "e92ca08496d686cf"]},
}


def _relocated(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str).replace(str(REPO), "<repo>"))


def _specs() -> dict[str, AuditSpec]:
    specs = {"demo": load_config(demo_config_path())}
    for f in sorted((REPO / "examples").glob("*.toml")) + [REPO / "examples" / "flower" / "audit.toml"]:
        if f.name != "policy.toml":
            specs[str(f.relative_to(REPO))] = load_config(f)
    demo = specs["demo"]
    specs["demo-faces"] = faces_spec()
    specs["demo-checkpoints"] = demo.replace(scenario=dataclasses.replace(demo.scenario, checkpoints=[0, 3]))
    specs["demo-compare"] = demo.replace(seeds=[0, 1, 2], defenses=DEMO_DEFENSES[2][1],
                                         scenario=dataclasses.replace(demo.scenario, clients_per_seed=8))
    return specs


def test_every_shipped_config_is_covered() -> None:
    assert set(_specs()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_canonical_config_and_hashes_are_unchanged(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _specs()[name]
    # The canonical config byte for byte (key order included), then the hashes taken over it.
    raw = json.dumps(_relocated(spec.raw))
    assert hashlib.sha256(raw.encode()).hexdigest()[:16] == EXPECTED[name]["raw"]
    monkeypatch.setattr(plan, "config_hash", lambda d: config_hash(_relocated(d)))
    monkeypatch.setattr(utility, "config_hash", lambda d: config_hash(_relocated(d)))
    cells = plan.plan_cells(spec, "none", TrainingSettings(max_rounds=7))
    assert [c.config_hash for c in cells] == EXPECTED[name]["cells"]
    keys = [utility.utility_key(spec, list(spec.defenses), s, TrainingSettings(), 10, None) for s in spec.seeds]
    assert keys == EXPECTED[name]["utility"]


def test_a_path_free_config_hashes_as_before_without_relocation() -> None:
    spec = load_config(REPO / "examples" / "fedavg.toml")
    assert [c.config_hash for c in plan.plan_cells(spec, "none")] == EXPECTED["examples/fedavg.toml"]["cells"]


def test_replace_round_trips_the_canonical_config() -> None:
    spec = load_config(demo_config_path())
    same = spec.replace(data=spec.data, scenario=spec.scenario, threat=spec.threat, output=spec.output,
                        attacks=spec.attacks)
    assert json.dumps(same.raw) == json.dumps(spec.raw) and same == spec
    fewer = spec.replace(seeds=[0])
    assert fewer.raw == {**spec.raw, "seeds": [0]} and fewer.output.dir == spec.output.dir
