"""The active-learning benchmark: does ALE pick better images than random and plain uncertainty sampling?

``newspecies`` generates the data set offline (handwritten digits from scikit-learn on CC0 textures from
scikit-image), with two digit classes held out of the base training set to play the paper's new species.
"""
