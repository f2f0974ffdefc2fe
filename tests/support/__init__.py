"""What the tests share: model builders, strategies, tolerances and assertions."""
