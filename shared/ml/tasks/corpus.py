"""A small fixed English corpus to train the tiny test tokenizer (deterministic, offline)."""

TINY_CORPUS = """\
Based on the sentences, is it true that the answer is yes? Yes or No or Maybe? Answer: Yes
Using only the above description and what you know about the world, is the claim definitely correct? Yes or no? Answer: No
What is a possible continuation for the story given the following options? A: the first B: the second. Answer: A
Does the word have the same meaning in the two sentences? Answer: No
Does the pronoun refer to the person named before? Answer: Yes
Is the review positive or negative? Answer: positive
Is the review positive or negative? Answer: negative
Is this sentence subjective or objective? Answer: subjective
Is this sentence subjective or objective? Answer: objective
Options: A: entailment B: contradiction C: neutral. Answer: A
The movie was great, funny and full of life. The plot was dull and the actors were bad.
The product works well and I would buy it again. The battery died after a week, which is terrible.
Question: what is the capital of the country? Passage: the city is the largest in the region.
True or false: the statement follows from the passage. Answer: true
True or false: the statement follows from the passage. Answer: false
the a an of to in on at for with by from is are was were be been it this that these those
he she they we you i his her their our your my me him them us what which who whom whose
cause effect because so then therefore however but and or not no yes maybe true false
good bad great terrible best worst love hate like dislike happy sad angry joy fear
one two three four five six seven eight nine ten first second third last next
"""
