window.initCgLinkGraph = function({visState, renderAll, data, cgSel}){
  var {nodes, links, metadata} = data

  // difract-ext: nodes laid out by band (layer × stream) and position group, see
  // difract/difract-util.js; every band labelled; no two nodes share a spot
  var c = d3.conventions({
    sel: cgSel.select('.link-graph').html(''),
    margin: {left: 52, bottom: 100, top: 30, right: 40},
    layers: 'sccccs',
  })
  
  c.svgBot = c.layers[0]
  var allCtx = {
    allLinks: c.layers[1],
    pinnedLinks: c.layers[2],
    bgLinks: c.layers[3],
    clickedLinks: c.layers[4]
  }
  c.svg = c.layers[5]

  var lay = difract.layout(nodes, metadata, c.width, c.height)
  c.svgBot.append('rect').at({width: c.width, height: c.height, fill: '#F5F4EE'})
  c.svgBot.append('g').appendMany('rect.difract-band', lay.bands)
    .at({y: d => d.y0, width: c.width, height: d => d.height,
      fill: (d, i) => d.key === 'emb' || d.key === 'targets' ? '#F0EEE7' : i % 2 ? '#F5F4EE' : '#EDEBE3'})
  c.svgBot.append('g').appendMany('rect.difract-group', lay.groups.filter((g, i) => i % 2))
    .at({x: d => d.x0, width: d => d.width, height: c.height, fill: 'rgba(255,255,255,.35)'})

  var bandTicks = lay.bands.map(b => ({...b, mid: (b.y0 + b.y1) / 2}))
  difract.thinLabels(bandTicks.slice().reverse(), d => d.mid, 11)
  c.svgBot.append('g.axis.difract-bands').appendMany('text.difract-band-label', bandTicks)
    .at({x: -6, y: d => d.mid, textAnchor: 'end', dominantBaseline: 'middle', fontSize: 10})
    .st({display: d => d.keep ? null : 'none'})
    .text(d => d.label)
  // difract-ext: what the glyphs and colours mean
  var legendItems = [['●', 'feature'], ['◆', 'error'], ['▲', 'unexplored residue'],
    ['■', 'input (Emb) / target'], ['', 'edges and fills: green +, purple −, to/from the clicked node']]
  var legendSel = c.svgBot.append('g.difract-graph-legend').translate([0, -16])
  var lx = 0
  legendItems.forEach(([glyph, text]) => {
    var item = legendSel.append('text').translate([lx, 0]).at({fontSize: 11, fill: '#555'})
    if (glyph) item.append('tspan').text(glyph + ' ').at({stroke: '#000', strokeWidth: .5, fill: '#fff'})
    item.append('tspan').text(text)
    lx += item.node().getComputedTextLength() + 16
  })
  document.body.dataset.difractFontSize = String(lay.fontSize)
  document.body.dataset.difractGrouped = lay.grouped ? '1' : ''
  // hover poitns
  var maxHoverDistance = 30
  c.sel
    .on('mousemove', (ev) => {
      if (ev.shiftKey) return
      var [mouseX, mouseY] = d3.pointer(ev)
      var [closestNode, closestDistance] = findClosestPoint(mouseX - c.margin.left, mouseY - c.margin.top, nodes)
      if (closestDistance > maxHoverDistance) {
        utilCg.unHoverFeature(visState, renderAll)
        utilCg.hideTooltip()
      } else if (visState.hoveredId !== closestNode) {
        utilCg.hoverFeature(visState, renderAll, closestNode)
        utilCg.showTooltip(ev, closestNode)
      }
    })
    .on('mouseleave', (ev) => {
      if (ev.shiftKey) return
      utilCg.unHoverFeature(visState, renderAll)
      utilCg.hideTooltip()
    })
    .on('click', (ev) => {
      var [mouseX, mouseY] = d3.pointer(ev)
      var [closestNode, closestDistance] = findClosestPoint(mouseX - c.margin.left, mouseY - c.margin.top, nodes)
      if (closestDistance > maxHoverDistance) {
        visState.clickedId = null
        visState.clickedCtxIdx = null
        renderAll.clickedId()
      } else {
        utilCg.clickFeature(visState, renderAll, closestNode, ev.metaKey || ev.ctrlKey)
      }
    })

  function findClosestPoint(mouseX, mouseY, points) {
    if (points.length === 0) return null

    let closestPoint = points[0]
    let closestDistance = distance(mouseX, mouseY, closestPoint.pos[0], closestPoint.pos[1])

    for (let i = 1; i < points.length; i++){
      var point = points[i]
      var dist = distance(mouseX, mouseY, point.pos[0], point.pos[1])
      if (dist < closestDistance){
        closestPoint = point
        closestDistance = dist
      }
    }
    return [closestPoint, closestDistance]

    function distance(x1, y1, x2, y2) {
      return Math.sqrt(Math.pow(x2 - x1, 2) + Math.pow(y2 - y1, 2))
    }
  }

  // set up dom
  var nodeSel = c.svg.appendMany('text.node', nodes)
    .translate(d => d.pos)
    .text(d => utilCg.featureTypeToText(d.feature_type))
    .at({
      fontSize: lay.fontSize,  // difract-ext: sized to the layout's spacing
      fill: d => d.nodeColor,
      stroke: '#000',
      strokeWidth: .5,
      textAnchor: 'middle',
      dominantBaseline: 'central',
    })
    // .call(utilCg.addFeatureTooltip)
    // .call(utilCg.addFeatureEvents(visState, renderAll, ev => ev.shiftKey))

  var hoverSel = c.svg.appendMany('circle', nodes)
    .translate(d => d.pos)
    .at({r: lay.fontSize * 0.7, cy: .5, stroke: '#f0f', strokeWidth: 2, strokeDasharray: '2 2', fill: 'none', display: 'xnone', pointEvents: 'none'})

  links.forEach(d => {
    var [x1, y1] = d.sourceNode.pos
    var [x2, y2] = d.targetNode.pos
    d.pathStr = `M${x1},${y1}L${x2},${y2}`
  })

  
  function drawLinks(links, ctx, strokeWidthOffset=0, colorOverride){
    ctx.clearRect(-c.margin.left, -c.margin.top, c.totalWidth, c.totalHeight)
    d3.sort(links, d => d.strokeWidth).forEach(d => {
      ctx.beginPath()
      ctx.moveTo(d.sourceNode.pos[0], d.sourceNode.pos[1])
      ctx.lineTo(d.targetNode.pos[0], d.targetNode.pos[1])
      ctx.strokeStyle = colorOverride || d.color
      ctx.lineWidth = d.strokeWidth + strokeWidthOffset
      ctx.stroke()
    })
  }

  function filterLinks(featureIds){
    var filteredLinks = []

    featureIds.forEach(nodeId => {
      nodes.filter(n => n.nodeId == nodeId).forEach(node => {
        if (visState.linkType == 'input' || visState.linkType == 'either') {
          Array.prototype.push.apply(filteredLinks, node.sourceLinks)
        }
        if (visState.linkType == 'output' || visState.linkType == 'either') {
          Array.prototype.push.apply(filteredLinks, node.targetLinks)
        }
        if (visState.linkType == 'both') {
          Array.prototype.push.apply(filteredLinks, node.sourceLinks.filter(
            link => visState.pinnedIds.includes(link.sourceNode.nodeId)
          ))
          Array.prototype.push.apply(filteredLinks, node.targetLinks.filter(
            link => visState.pinnedIds.includes(link.targetNode.nodeId)
          ))
        }
      })
    })

    return filteredLinks
  }

  // drawLinks(links, allCtx.allLinks, 0, 'rgba(0,0,0,.05)')
  // renderAll.isShowAllLinks.fns['linkGraph'] = () => c.sel.select('canvas').st({display: visState.isShowAllLinks ? '' : 'none'})

  function renderPinnedIds(){
    drawLinks(visState.clickedId ? [] : filterLinks(visState.pinnedIds), allCtx.pinnedLinks)
    nodeSel.classed('pinned', d => visState.pinnedIds.includes(d.nodeId))
  }
  renderAll.pinnedIds.fns['linkGraph'] = renderPinnedIds

  function renderHiddenIds(){
    var hiddenIdSet = new Set(visState.hiddenIds)
    nodeSel.classed('hidden', d => hiddenIdSet.has(d.featureId))
  }
  renderAll.hiddenIds.fns['linkGraph'] = renderHiddenIds


  function renderClicked(){
    var clickedLinks = []
    if (visState.clickedId) {
      clickedLinks = links.filter(link => 
        link.sourceNode.nodeId === visState.clickedId || 
        link.targetNode.nodeId === visState.clickedId
      )
    }

    drawLinks(clickedLinks, allCtx.bgLinks, .05, '#000')
    drawLinks(clickedLinks, allCtx.clickedLinks)
    nodeSel.classed('clicked', e => e.nodeId === visState.clickedId)
    
    drawLinks(visState.clickedId ? [] : filterLinks(visState.pinnedIds), allCtx.pinnedLinks)


    nodeSel
      .at({fill: '#fff'})
      .filter(d => d.tmpClickedLink?.tmpColor)
      .at({fill: d => d.tmpClickedLink.tmpColor})
      .raise()
  }

  renderAll.clickedId.fns['linkGraph'] = renderClicked
  renderAll.linkType.fns['linkGraph'] = () => {
    renderPinnedIds()
    renderClicked()
  }

  renderAll.hoveredId.fns['linkGraph'] = () => {
    hoverSel.st({display: e => e.featureId == visState.hoveredId ? '' : 'none'})
  }

  // Add x axis text/lines
  // difract-ext: one label per shown position (or position group when they are too many), every
  // label kept only where it does not collide with the previous one; the hidden ones stay in the
  // DOM (display none) and show in the node tooltip
  var promptTicks = lay.groups.filter(g => g.kind !== 'targets').map(g => ({
    token: g.label, mid: g.x0 + g.width / 2, x0: g.x0, x1: g.x0 + g.width, group: g,
  }))
  difract.thinLabels(promptTicks, d => d.mid, 13)
  var xTickSel = c.svgBot.appendMany('g.prompt-token', promptTicks)
    .translate(d => [d.mid, c.height])
  xTickSel.append('path').at({d: d => `M${d.x0 - d.mid},2H${d.x1 - d.mid}`, stroke: '#B0AEA6'})
  xTickSel.append('text').text(d => d.token)
    .at({
      x: -6,
      y: 0,
      textAnchor: 'end',
      transform: 'rotate(-90)',
      dominantBaseline: 'middle',
      fontSize: 10,
    })
    .st({display: d => d.keep ? null : 'none'})
    .classed('collided', d => !d.keep)
  xTickSel.append('title').text(d => d.group.members.length > 1
    ? d.token + ' (' + d.group.members.length + ' positions)' : d.token)

  // difract-ext: targets labelled by what they are (region × direction) and their value
  var logitTickSel = c.svgBot.append('g.axis').appendMany('g', nodes.filter(d => d.feature_type == 'logit'))
    .translate(d => d.pos)
  logitTickSel.append('text.difract-target-label').text(d => d.clerp)
    .at({x: -lay.fontSize, y: 0, textAnchor: 'end', dominantBaseline: 'middle', fontSize: 12})
    .st({fill: '#333'})

  utilCg.addPinnedClickedGradient(c.svg)
}

window.init?.()
