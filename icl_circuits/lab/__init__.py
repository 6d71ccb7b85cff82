"""The training-dynamics lab (issue 16): train small models on the ICL corpus with checkpoints
(:func:`icl_circuits.lab.train.train`), measure the circuit over training (:mod:`.dynamics`), and run grids
of runs on Ray (:mod:`.sweep`). The submodules keep their names (``lab.train`` is the module)."""

from icl_circuits.lab.config import LabConfig, load_config

__all__ = ["LabConfig", "load_config"]
