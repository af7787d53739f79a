"""Entry point: python -m experiments.dann --config=experiments/configs/dann.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("dann"))
