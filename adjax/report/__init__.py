"""Result reports: tables, the HTML report, heatmaps and overlays."""
