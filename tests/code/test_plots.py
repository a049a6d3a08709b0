from pipeline.core.plots import accuracy_limits, training_curves


def history(*pairs):
    return [{"epoch": i + 1, "loss": 1.0 / (i + 1), "val_loss": 0.5 / (i + 1), "accuracy": a, "val_accuracy": v}
            for i, (a, v) in enumerate(pairs)]


def test_the_accuracy_axis_zooms_past_the_first_epoch():
    low, high = accuracy_limits(history((0.80, 0.95), (0.97, 0.985), (0.98, 0.99)))
    assert 0.95 < low < 0.97 and 0.99 < high <= 1.0  # epoch 1's 0.80 would squash the rest


def test_one_epoch_and_perfect_scores_stay_in_range():
    assert accuracy_limits(history((0.9, 0.95)))[0] < 0.9
    assert accuracy_limits(history((0.5, 0.6), (1.0, 1.0)))[1] == 1.0


def test_the_figure_has_a_title_naming_the_best_epoch():
    figure = training_curves(history((0.80, 0.95), (0.97, 0.985), (0.98, 0.99)))
    assert "best val_accuracy 0.9900 at epoch 3" in figure.texts[0].get_text()
