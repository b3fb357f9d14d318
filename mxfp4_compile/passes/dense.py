FORM = "dense"

def match(ctx):
    return []
