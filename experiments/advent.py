"""Entry point: python -m experiments.advent --config=experiments/configs/advent.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("advent"))
