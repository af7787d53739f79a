"""Entry point: python -m experiments.source_only --config=experiments/configs/source_only.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("source_only"))
