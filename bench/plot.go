package bench

import (
	"fmt"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// plot draws the pictures into dir and returns their file names: one
// grouped bar chart per group of measures (configurations side by side,
// the median as the bar), and the sequence trace.
func (r *Report) plot(dir string) ([]string, error) {
	groups := []struct {
		file, title, unit string
		keys              []string
	}{
		{"rr.png", "Request/response rate", "transactions/s", []string{"rr_1b_1c", "rr_1b_8c", "rr_1460b_1c", "rr_1460b_8c"}},
		{"bulk.png", "Bulk throughput (iperf3)", "Gbit/s", []string{"bulk_c2s", "bulk_s2c"}},
		{"cpu.png", "Gateway CPU cost (lower is better)", "µs per transaction / s per GB", []string{"cpu_us_per_tx", "cpu_s_per_gb"}},
	}
	var files []string
	for _, g := range groups {
		if err := r.barChart(filepath.Join(dir, g.file), g.title, g.unit, g.keys); err != nil {
			return nil, err
		}
		files = append(files, g.file)
	}
	if t := r.Trace; t != nil && len(t.Points) > 0 {
		if err := t.draw(filepath.Join(dir, "trace.png")); err != nil {
			return nil, err
		}
		t.Picture = "trace.png"
		files = append(files, "trace.png")
	}
	return files, nil
}

func (r *Report) barChart(file, title, unit string, keys []string) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = unit
	p.Legend.Top = true
	var names []string
	for _, k := range keys {
		for _, m := range Metrics {
			if m.Key == k {
				names = append(names, m.Title)
			}
		}
	}
	width := vg.Points(60 / float64(max(len(r.Configs), 1)))
	top := 0.0
	for i := range r.Configs {
		c := &r.Configs[i]
		vals := make(plotter.Values, len(keys))
		for j, k := range keys {
			if st, ok := c.Metrics[k]; ok && c.Failed == "" {
				vals[j] = st.Median
				top = max(top, st.Median)
			}
		}
		bars, err := plotter.NewBarChart(vals, width)
		if err != nil {
			return err
		}
		bars.LineStyle.Width = 0
		bars.Color = plotutil.Color(i)
		bars.Offset = width * vg.Length(float64(i)-float64(len(r.Configs)-1)/2)
		p.Add(bars)
		label := c.Name
		if c.Failed != "" {
			label += " (failed)"
		}
		p.Legend.Add(label, bars)
	}
	p.NominalX(names...)
	p.Y.Min, p.Y.Max = 0, top*1.45 // room for the legend above the bars
	return p.Save(vg.Length(160+60*len(keys))*vg.Millimeter/2, 110*vg.Millimeter, file)
}

func (t *Trace) draw(file string) error {
	p := plot.New()
	p.Title.Text = "Sequence number of a busy flow across its splice and unsplice (client to server)"
	p.X.Label.Text = "time (ms)"
	p.Y.Label.Text = "sequence offset (MB)"
	pts := make(plotter.XYs, len(t.Points))
	for i, pt := range t.Points {
		pts[i].X, pts[i].Y = pt[0], pt[1]/(1<<20)
	}
	sc, err := plotter.NewScatter(pts)
	if err != nil {
		return err
	}
	sc.GlyphStyle.Radius = vg.Points(0.8)
	sc.GlyphStyle.Color = plotutil.Color(0)
	p.Add(sc)
	ymax := 0.0
	for _, pt := range pts {
		ymax = max(ymax, pt.Y)
	}
	p.Legend.Add("client-to-server segments at the server", sc)
	for i, tr := range []struct {
		name       string
		start, end float64
	}{{"splice", t.SpliceStartMS, t.SpliceEndMS}, {"unsplice", t.UnspliceStartMS, t.UnspliceEndMS}} {
		if tr.start == 0 && tr.end == 0 {
			continue
		}
		var mark *plotter.Line
		for _, x := range []float64{tr.start, tr.end} {
			l, err := plotter.NewLine(plotter.XYs{{X: x, Y: 0}, {X: x, Y: ymax}})
			if err != nil {
				return err
			}
			l.Color = plotutil.Color(1 + i)
			p.Add(l)
			mark = l
		}
		p.Legend.Add(fmt.Sprintf("%s: %.1f–%.1f ms", tr.name, tr.start, tr.end), mark)
	}
	p.Legend.Top = true
	p.Legend.Left = true
	return p.Save(180*vg.Millimeter, 110*vg.Millimeter, file)
}
