"""IG on a user's own model from saved weights, over several initialisations: the figures behind the PSNR bar
of tests/test_own_model.py.

Inverting Gradients (Geiping et al. 2020), SoK class B, FedSGD, batch 1. The model, the data and the config
are those of the test (its module source, seven scikit-image photographs at 48 px RGB with a normalisation,
BatchNorm in eval mode, IG 200 iterations with TV 0.1): for each initialisation seed the untrained state is
saved as a .safetensors file and a briefly trained one (five SGD steps at lr 0.005) as a torch state dict, and
`giaudit.audit` attacks each from its file. Prints the PSNR of every audit and the range per state.

    python benchmarks/own_model.py [--inits 4] [--iterations 200]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import giaudit
from giaudit.config import load_config
from giaudit.scenario.build import global_model, load_data
from giaudit.scenario.client import pretrain
from giaudit.scenario.factory import call_factory
from giaudit.scenario.models import seeded_init

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_own_model import ARGS, MODULE, PHOTOS, SOURCE, config_text  # noqa: E402  (one definition of the model)


def photos(root: Path) -> None:
    import skimage.data

    rng = np.random.default_rng(0)
    for name in PHOTOS:
        img = getattr(skimage.data, name)()[..., :3]
        (root / "photos" / name).mkdir(parents=True)
        h, w = img.shape[:2]
        for i in range(4):
            s = int(min(h, w) * rng.uniform(0.8, 1.0))
            y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            Image.fromarray(img[y:y + s, x:x + s]).resize((48, 48), Image.BILINEAR).save(root / "photos" / name
                                                                                         / f"{i}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inits", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[float]] = {"untrained": [], "trained": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / f"{MODULE}.py").write_text(SOURCE)
        photos(root)
        for init in range(args.inits):
            untrained = seeded_init(lambda: call_factory("scenario.model", f"{MODULE}:make_net", ARGS, root),
                                    torch.Generator().manual_seed(init))
            save_file(untrained.state_dict(), root / "untrained.safetensors")
            (root / "audit.toml").write_text(config_text().replace("iterations = 200",
                                                                   f"iterations = {args.iterations}"))
            spec = load_config(root / "audit.toml")
            images = load_data(spec.data)
            trained, _ = global_model(spec.data, spec.scenario, images.spec, torch.Generator().manual_seed(1), root)
            pretrain(trained, images, 5, torch.Generator().manual_seed(2), lr=0.005, batch_size=8)
            torch.save(trained.state_dict(), root / "trained.pt")
            for state, file in (("untrained", "untrained.safetensors"), ("trained", "trained.pt")):
                s = spec.replace(scenario={**spec.raw["scenario"], "weights": str(root / file)})
                psnr = giaudit.audit(s).records[0].metrics["psnr_db_mean"]
                results[state].append(psnr)
                print(f"init {init} {state:>9}: PSNR {psnr:5.1f} dB", flush=True)
    for state, values in results.items():
        print(f"{state:>9}: {min(values):.1f}-{max(values):.1f} dB over {len(values)} initialisations")


if __name__ == "__main__":
    main()
