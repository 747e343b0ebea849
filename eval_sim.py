"""Evaluate a policy in simulation: success rates with 95% intervals, a plot, videos.

    python eval_sim.py policy=scripted sim=suite episodes=20
    python eval_sim.py policy=random sim=lift episodes=50 name=random_lift
    python eval_sim.py policy=<name> steer=true ...       # value-steered (V-GPS) policy
    python eval_sim.py ... name=B compare_to=runs/eval_sim/A  # then paired with run A (same seed)
    python -m sim.report runs/eval_sim/A runs/eval_sim/B  # compare runs on the same seeds

`episodes` is per task. Outputs go to runs/eval_sim/<name or timestamp>/. See docs/sim.md.
"""

from configs.run import hydra_main


@hydra_main("eval_sim")
def main(cfg) -> None:
    from sim.evaluate import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
