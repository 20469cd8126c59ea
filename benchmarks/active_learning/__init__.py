"""The active-learning benchmark: does labelling in the default strategy's order beat random order, above all on
classes the model has never seen?

``newspecies`` generates the data set offline (handwritten digits from scikit-learn on CC0 textures from
scikit-image), with two digit classes held out of the base training set to play new species; ``protocol`` runs the
strategies against each other; ``diagnosis`` records what the base model outputs over the pool's objects;
``evaluation`` scores every model on a fixed test set; ``report`` writes the tables and plots.
"""
