"""Entry point: python -m experiments.cbst --config=experiments/configs/cbst.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("cbst"))
