"""The dev split: the attacks of ``cbd_fast.evaluation.backdoors``, delegated, not re-implemented.

These are the attacks the defense was tuned on (``badnets``, ``blended``, ``sig``, ``wanet``,
``badencoder``). On ``fmnistnet`` a build calls ``backdoors.build_backdoored_model`` itself, so the model
is bit-identical to the one the rest of the evaluation trains (same seed, one thread). On the other
architectures the poisoning is ``backdoors.poison_dataset`` with ``backdoors.make_trigger`` and the
training is the architecture's recipe (``training.train_victim``), as ``scripts/stability_matrix.py``
does; ``badencoder`` plants with ``backdoors.plant_feature_backdoor`` and the BadNets patch exactly as
``build_backdoored_model`` does on ``FMNISTNet``.
"""

from __future__ import annotations

import torch

from cbd_fast.evaluation import backdoors
from cbd_fast.evaluation.zoo.training import BuildJob, ZooBuild, new_model, poison_index, train_victim

__all__ = ["DEV_CITATIONS", "build_dev", "dev_trigger"]

#: the paper behind each dev attack (see ``backdoors.py`` for the settings).
DEV_CITATIONS: dict[str, str] = {
    "badnets": "Gu, Dolan-Gavitt, Garg. BadNets: Identifying Vulnerabilities in the Machine Learning Model "
    "Supply Chain. arXiv:1708.06733, 2017",
    "blended": "Chen, Liu, Li, Lu, Song. Targeted Backdoor Attacks on Deep Learning Systems Using Data "
    "Poisoning. arXiv:1712.05526, 2017",
    "sig": "Barni, Kallas, Tondi. A New Backdoor Attack in CNNs by Training Set Corruption without Label "
    "Poisoning. ICIP 2019",
    "wanet": "Nguyen, Tran. WaNet - Imperceptible Warping-based Backdoor Attack. ICLR 2021",
    "badencoder": "Jia, Liu, Gong. BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised "
    "Learning. IEEE S&P 2022",
}

#: shadow images and planting epochs of ``build_backdoored_model``'s badencoder (kept in step with it).
_SHADOW, _REFERENCES, _PLANT_EPOCHS = 10000, 10, 2


def dev_trigger(attack: str) -> backdoors.Trigger:
    """The test-time trigger of a dev attack: ``backdoors.trigger_for(attack)``."""
    return backdoors.trigger_for(attack)


def build_dev(job: BuildJob) -> ZooBuild:
    """Build a dev attack (see the module docstring for what is delegated where)."""
    attack, train = job.attack, job.train
    supervised = attack in backdoors.SUPERVISED_ATTACKS
    if job.arch == "fmnistnet":
        model = backdoors.build_backdoored_model(
            attack,
            train,
            seed=job.seed,
            epochs=job.epochs,
            rate=job.rate,
            target=job.target,
            progress=job.progress,
        )
    elif supervised:
        model = new_model(job.arch, job.seed)
        poisoned, _ = backdoors.poison_dataset(
            train, backdoors.make_trigger(attack), rate=job.rate, target=job.target, seed=job.seed
        )
        train_victim(job.arch, model, poisoned, epochs=job.epochs, seed=job.seed, progress=job.progress)
    else:
        model = new_model(job.arch, job.seed)
        train_victim(job.arch, model, train, epochs=job.epochs, seed=job.seed, progress=job.progress)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(job.seed + 1))
        shadow = train.images[perm[:_SHADOW]]
        ref = train.images[(train.labels == job.target).nonzero().squeeze(1)[:_REFERENCES]]
        backdoors.plant_feature_backdoor(
            model.backbone,
            shadow,
            ref,
            backdoors.BadNets(),
            epochs=_PLANT_EPOCHS,
            seed=job.seed,
            progress=job.progress,
        )
        model.eval()
    if supervised:
        index = poison_index(len(train), job.rate, job.seed)
        info = {"poisoned": len(index), "relabelled": len(index)}
    else:
        index = torch.empty(0, dtype=torch.long)
        info = {"poisoned": 0, "relabelled": 0, "shadow_images": min(_SHADOW, len(train))}
    return ZooBuild(
        model, dev_trigger(attack), index, {**info, "delegated_to": "cbd_fast.evaluation.backdoors"}
    )
