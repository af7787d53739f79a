"""Entry point: python -m experiments.crst --config=experiments/configs/crst.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("crst"))
