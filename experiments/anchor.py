"""Entry point: python -m experiments.anchor --config=experiments/configs/anchor.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("anchor"))
