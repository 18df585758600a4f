"""Codebook compression (Choi et al. 2017): pruning masks, clustering, Huffman coding, .qcz files.

Facts shared by the passes of this family (`PassContext.facts`):
"""

#: {weight initializer name: bool mask, True where the weight was pruned}, written by
#: prune-magnitude; cluster-weights keeps those weights at an exact zero centre and codes them as
#: run lengths, finetune-codebook never moves that centre.
PRUNED_FACT = "pruned"
#: Metadata key on the Gather node of a clustered weight: the codebook index that holds the
#: pruned zeros ("" when the weight has none). Lets size accounting and packing work from the
#: saved model alone.
ZERO_INDEX_KEY = "qc.codebook.zero_index"
#: {weight initializer name: float array before clustering}, written by cluster-weights; the
#: label-free loss of finetune-codebook compares against the network with these weights.
FLOAT_WEIGHTS_FACT = "float_weights"
