"""Make an exported model folder loadable without this repository: the Hugging Face "remote code" way.

transformers only knows the architectures it ships; ours is registered at runtime by `import model`, so a
bare export fails in any other process ("does not recognize this architecture"), e.g. under
`lm_eval --model hf`. The ecosystem's answer for out-of-tree architectures is to put the model's own python
files next to the weights and name its classes in config.json's `auto_map`; then
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` imports those files from the folder.

Trusting the code means exactly that: transformers *executes the .py files in the folder* with your
privileges. Only pass trust_remote_code=True for folders you exported yourself or whose .py files you have
reviewed; copying a folder copies its code.

The files are copied from `model/` at export time, byte for byte, so they are never a second copy that can
drift. Which files: the one defining GrokForCausalLM plus everything it imports relatively, found by
transformers' own `get_relative_import_files`, i.e. the same walk the loader does (config, attention, moe,
grok). `accounting.py`, `presets.py`, `__init__.py` and `__main__.py` are not imported by the model and
stay behind: inference needs none of them, and `__init__.py` would re-register with the Auto classes.
"""

import inspect
import json
import shutil
from pathlib import Path

from transformers.dynamic_module_utils import check_imports, get_relative_import_files

from model import GrokConfig, GrokForCausalLM

AUTO_CLASSES = {"AutoConfig": GrokConfig, "AutoModelForCausalLM": GrokForCausalLM}


def model_code_files() -> list[Path]:
    """The model/ sources an export needs: GrokForCausalLM's file and its relative imports, recursively."""
    entry = Path(inspect.getsourcefile(GrokForCausalLM))
    files = [entry, *sorted(Path(p) for p in get_relative_import_files(entry))]
    for cls in AUTO_CLASSES.values():
        if Path(inspect.getsourcefile(cls)) not in files:
            raise RuntimeError(f"{cls.__name__} is defined outside the files copied for {entry.name}")
    for file in files:
        # The loader rejects absolute imports of uninstalled packages; fail at export, not at load.
        check_imports(file)
        if file.name == "__init__.py":
            raise RuntimeError(f"{file} would be copied: a model file imports the package, not a sibling")
    return files


def write_model_code(folder: Path) -> None:
    """Copy the model's code into `folder` (made by save_pretrained) and point config.json's auto_map at it.
    The folder is export's temporary one: it appears whole, fsynced, or not at all (data/folders.py).

    Afterwards `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works in a process that
    never imported `model`; plain `from_pretrained(folder)` after `import model` is unchanged (it ignores
    auto_map for a registered model_type unless trust_remote_code is passed).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("model_type") != GrokConfig.model_type:
        raise ValueError(f"{config_path} has model_type {config.get('model_type')!r}, not {GrokConfig.model_type!r}")
    for file in model_code_files():
        shutil.copyfile(file, folder / file.name)
    config["auto_map"] = {
        auto: f"{Path(inspect.getsourcefile(cls)).stem}.{cls.__name__}" for auto, cls in AUTO_CLASSES.items()
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
