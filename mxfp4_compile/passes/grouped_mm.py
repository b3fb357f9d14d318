FORM = "grouped_mm"

def match(ctx):
    return []
