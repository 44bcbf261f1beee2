"""The tools above the trainer: export (and the model code an export carries), evaluation, generation,
training curves, benchmarks and their baselines, the fault report and the cluster planner (`planner/`).
Each module with a `main` is one command line under scripts/."""
