"""The audit's orchestration: config -> scenario -> defenses -> attacks -> metrics -> results.

- `plan`: the cells of a spec (one per scenario, defense, attack, seed and checkpoint round), their record
  ids and config hashes;
- `cell`: computing one cell from its own seeds (`run_cell`);
- `record`: a finished cell's outcome -> its `AuditRecord`;
- `checkpoints`: the federated training whose rounds' global models the checkpoint cells attack;
- `evaluators`: loading what scores reconstructions (LPIPS, attribute classifiers, face analyzer, galleries);
- `run`: the driver (`run_audit`), which runs the cells on an engine and writes each record as it arrives.
"""
from giaudit.orchestration.plan import Cell, plan_cells
from giaudit.orchestration.run import run_audit

__all__ = ["Cell", "plan_cells", "run_audit"]
