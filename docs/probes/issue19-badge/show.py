import sys, torch
from PIL import Image
d = torch.load(sys.argv[1])
rows = []
for sid, m in d.items():
    row = torch.cat([m["default"], m["badge"][1:]] if "badge" in m else [m["default"]])
    rows.append(torch.cat(list(row.float()), 2))
w = max(r.shape[2] for r in rows)
grid = torch.cat([torch.nn.functional.pad(r, (0, w - r.shape[2]), value=1) for r in rows], 1)
Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype("uint8")).resize((grid.shape[2] * 2, grid.shape[1] * 2), Image.NEAREST).save(sys.argv[2])
