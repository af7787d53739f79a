"""Entry point: python -m experiments.source_only_cls --config=experiments/configs/source_only_cls.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("source_only_cls"))
