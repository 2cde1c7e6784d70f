"""Issue 18 case 9: adapter_config.json's module selection (target_modules, exclude_modules,
layers_to_transform, layers_pattern) is honoured as PEFT 0.21 honours it when it loads a
directory, or refused naming the file and field. Oracle: real PEFT's PeftModel.from_pretrained
on the torch twin, on directories real PEFT wrote (then edited where a test says so)."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_peft import _base, _ours, _peft_directory, _torch_out, _torch_twin

import minilora_jax as mlj

pytestmark = pytest.mark.slow


def _peft_loads(directory, base):
    """What real PEFT computes after loading ``directory`` onto the twin of ``base``."""
    peft = pytest.importorskip("peft")
    return _torch_out(peft.PeftModel.from_pretrained(_torch_twin(base), str(directory)).eval())


def _edit(directory, **changes):
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("config", [
    {"exclude_modules": ["model.layers.0.q_proj"]},
    {"exclude_modules": r"model\.layers\.[12]\.up_proj"},
    {"layers_to_transform": [1, 2]},
    {"layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": r".*layers\.[01]\.(q|up)_proj"},
])
def test_module_selection_peft_wrote_loads_as_peft_loads_it(tmp_path, config):
    model, base = _base()
    directory, expected, _ = _peft_directory(tmp_path, base, **config)
    np.testing.assert_allclose(_peft_loads(directory, base), expected, atol=1e-6)
    np.testing.assert_allclose(_ours(model, mlj.peft.load(directory, base)), expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("field,value", [
    ("exclude_modules", ["model.layers.0.q_proj"]),
    ("exclude_modules", r"model\.layers\.0\.q_proj"),
    ("layers_to_transform", [1, 2]),
    ("target_modules", ["up_proj"]),
])
def test_module_selection_that_leaves_out_a_module_with_tensors_is_refused(tmp_path, field,
                                                                           value):
    """PEFT ignores the tensors of a module its config does not adapt: not harmless."""
    model, base = _base()
    directory, full, _ = _peft_directory(tmp_path, base)
    _edit(directory, **{field: value})
    assert not np.allclose(_peft_loads(directory, base), full, atol=1e-4)  # PEFT drops some
    with pytest.raises(ValueError, match=rf"adapter_config\.json: '{field}' is .* leaves module "
                                         r"'model\.layers\.0\.q_proj' without an adapter"):
        mlj.peft.load(directory, base)
    with pytest.raises(ValueError, match=rf"'{field}'"):
        mlj.peft.read(directory)


@pytest.mark.filterwarnings("ignore")
def test_target_modules_matching_nothing_is_refused_as_peft_refuses_it(tmp_path):
    peft = pytest.importorskip("peft")
    _, base = _base()
    directory, _, _ = _peft_directory(tmp_path, base)
    _edit(directory, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="not found in the base model"):
        peft.PeftModel.from_pretrained(_torch_twin(base), str(directory))
    with pytest.raises(ValueError, match=r"'target_modules' is \['v_proj'\], which leaves"):
        mlj.peft.load(directory, base)


@pytest.mark.parametrize("value,why", [
    (None, "expected a regex string or a list of module names"),
    ("all-linear", "expected a regex string or a list"),
    (3, "expected a regex string"),
])
def test_target_modules_that_depend_on_the_torch_model_are_refused(tmp_path, value, why):
    _, base = _base()
    mlj.peft.save(tmp_path, mlj.init(base, jax.random.key(0), rank=2))
    _edit(tmp_path, target_modules=value)
    with pytest.raises(ValueError, match=rf"adapter_config\.json: 'target_modules' is .*{why}"):
        mlj.peft.read(tmp_path)


@pytest.mark.filterwarnings("ignore")
def test_targeted_module_without_tensors_under_random_init_is_refused(tmp_path):
    """With init_lora_weights false, PEFT leaves a targeted module without tensors random."""
    model, base = _base()
    directory, expected, _ = _peft_directory(tmp_path, base, init_lora_weights=False)
    np.testing.assert_allclose(_ours(model, mlj.peft.load(directory, base)), expected, atol=1e-5)
    weights = directory / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if ".layers.0.q_proj." not in k}
    save_file(tensors, weights)
    assert not np.allclose(_peft_loads(directory, base), expected, atol=1e-4)
    with pytest.raises(ValueError, match=r"give \['model\.layers\.0\.q_proj'\] an adapter in PEFT"
                                         r".*no tensors"):
        mlj.peft.load(directory, base)
    # under the default init the missing module's adapter is inert in PEFT too: it loads, equal
    _edit(directory, init_lora_weights=True)
    np.testing.assert_allclose(_ours(model, mlj.peft.load(directory, base)),
                               _peft_loads(directory, base), atol=1e-5)
