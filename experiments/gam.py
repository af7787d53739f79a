"""Entry point: python -m experiments.gam --config=experiments/configs/gam.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("gam"))
